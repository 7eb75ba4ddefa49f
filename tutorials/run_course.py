"""Execute every lesson top to bottom (as handed out: exercises not done) and write the executed copies to
runs/course/, printing each lesson's time. `make course` runs it; DEEPALIGN_COURSE_WORLD picks another world.

    python tutorials/run_course.py [lesson1 ...]
"""

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "runs" / "course"


def main(names: list[str]) -> None:
    lessons = sorted(HERE.glob("lesson*.ipynb"))
    lessons = [p for p in lessons if not names or any(p.stem.startswith(n) for n in names)]
    OUT.mkdir(parents=True, exist_ok=True)
    for path in lessons:
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        print(f"{path.name} ...", flush=True)
        NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
        ).execute()
        nbformat.write(nb, OUT / path.name)
        print(f"    {time.perf_counter() - start:.0f} s -> {OUT / path.name}", flush=True)
    print("open the lessons with `jupyter lab tutorials/` (the executed copies are in runs/course/)")


if __name__ == "__main__":
    main(sys.argv[1:])
