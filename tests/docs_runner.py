"""Run a markdown guide's `python` and `bash` blocks in document order (python blocks share one
namespace, like a notebook); print DOCS-OK when every block succeeded.

Usage: python docs_runner.py GUIDE.md   (run in an empty directory)
"""

import re
import subprocess
import sys

BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(path: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(open(path, encoding="utf-8").read())]


def main() -> None:
    namespace: dict = {"__name__": "__docs__"}
    for k, (lang, code) in enumerate(blocks(sys.argv[1])):
        if lang == "python":
            print(f"--- block {k} (python)", flush=True)
            exec(compile(code, f"{sys.argv[1]}:block{k}", "exec"), namespace)
        elif lang == "bash":
            print(f"--- block {k} (bash)", flush=True)
            p = subprocess.run(["bash", "-euo", "pipefail", "-c", code], text=True, capture_output=True)
            print(p.stdout, p.stderr[-3000:], flush=True)
            if p.returncode != 0:
                raise SystemExit(f"bash block {k} exited {p.returncode}")
    print("DOCS-OK", flush=True)


if __name__ == "__main__":
    main()
