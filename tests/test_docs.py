"""The README's quickstart is what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme
    assert "python -m jaxtrain.main --config=configs/clip.py" in readme


def test_launch_scripts_parse_and_are_documented():
    import subprocess

    build = (ROOT / "BUILD.md").read_text()
    for script in (ROOT / "launch").iterdir():
        subprocess.run(["bash", "-n", str(script)], check=True)
        assert f"launch/{script.name}" in build, f"{script.name} is not documented in BUILD.md"
