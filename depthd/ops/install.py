"""`depthd install-service` / `uninstall-service`: put the systemd unit and the example config in place.

The unit is systemd/depthd.service with ExecStart pointing at the `depthd` of the
environment this command runs from, so the service runs the daemon that was installed
(its venv), not whatever is first on PATH.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

UNIT_PATH = Path("etc/systemd/system/depthd.service")
CONFIG_PATH = Path("etc/depthd/depthd.yaml")
CONFIG_IN_UNIT = "/etc/depthd/depthd.yaml"
HOMES = ("/home/", "/root/")


class InstallError(Exception):
    pass


@dataclass(frozen=True)
class InstallPlan:
    unit_path: Path
    unit: str
    config_path: Path
    config: str
    write_config: bool
    """False when a config is already there: it is never overwritten."""
    notes: tuple[str, ...] = ()


def shipped_file(name: str) -> Path:
    """A file of systemd/: from the source tree, or from `<prefix>/share/depthd` of an installed wheel."""
    for folder in (Path(__file__).resolve().parents[2] / "systemd", Path(sys.prefix) / "share" / "depthd"):
        if (folder / name).is_file():
            return folder / name
    raise InstallError(f"cannot find {name} (looked in the source tree and {Path(sys.prefix) / 'share' / 'depthd'})")


def daemon_command() -> str:
    """How systemd should start this installation's daemon: its console script, or its python -m."""
    script = Path(sys.executable).parent / "depthd"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    return f"{sys.executable} -m depthd"


def render_unit(template: str, command: str, runtime: list[Path]) -> tuple[str, tuple[str, ...]]:
    """The unit for `command`; `runtime` are the paths it needs to read (venv, interpreter)."""
    unit = re.sub(r"^ExecStart=.*$", f"ExecStart={command} serve --config {CONFIG_IN_UNIT}", template, count=1, flags=re.M)
    in_home = sorted({str(p) for p in runtime if str(p).startswith(HOMES)})
    if not in_home:
        return unit, ()
    # ProtectHome=yes would hide the daemon's own files from it
    unit = unit.replace(
        "ProtectHome=yes", "# depthd is installed under a home directory, which it must read\nProtectHome=read-only"
    )
    note = (
        f"{', '.join(in_home)} {'is' if len(in_home) == 1 else 'are'} under a home directory: the service's "
        "dynamic user cannot read a private home; install depthd (and its Python) in /opt/depthd instead"
    )
    return unit, (note,)


def install_plan(prefix: Path) -> InstallPlan:
    runtime = [Path(sys.prefix), Path(sys.executable).resolve()]
    unit, notes = render_unit(shipped_file("depthd.service").read_text(), daemon_command(), runtime)
    config_path = prefix / CONFIG_PATH
    return InstallPlan(
        unit_path=prefix / UNIT_PATH,
        unit=unit,
        config_path=config_path,
        config=shipped_file("depthd.yaml").read_text(),
        write_config=not config_path.exists(),
        notes=notes,
    )


def install(prefix: Path = Path("/"), dry_run: bool = False, out=None) -> int:
    out = out or sys.stdout
    if not dry_run and prefix == Path("/") and os.geteuid() != 0:
        raise InstallError("writing /etc needs root: run it with sudo (or see --dry-run and --prefix)")
    steps = install_plan(prefix)
    if dry_run:
        print(f"# {steps.unit_path}\n{steps.unit}", file=out)
        if steps.write_config:
            print(f"# {steps.config_path}\n{steps.config}", file=out)
        else:
            print(f"# {steps.config_path} exists and is kept", file=out)
    else:
        steps.unit_path.parent.mkdir(parents=True, exist_ok=True)
        steps.unit_path.write_text(steps.unit)
        print(f"wrote {steps.unit_path}", file=out)
        if steps.write_config:
            steps.config_path.parent.mkdir(parents=True, exist_ok=True)
            steps.config_path.write_text(steps.config)
            print(f"wrote {steps.config_path} (edit its models, then start the service)", file=out)
        else:
            print(f"kept {steps.config_path}", file=out)
    for note in steps.notes:
        print(f"note: {note}", file=out)
    print("then: systemctl daemon-reload && systemctl enable --now depthd", file=out)
    return 0


def uninstall(prefix: Path = Path("/"), out=None) -> int:
    """Remove the unit, and the config if it is still the shipped example; an edited config is kept."""
    out = out or sys.stdout
    if prefix == Path("/") and os.geteuid() != 0:
        raise InstallError("removing files from /etc needs root: run it with sudo")
    unit_path, config_path = prefix / UNIT_PATH, prefix / CONFIG_PATH
    enabled = prefix / "etc/systemd/system/multi-user.target.wants/depthd.service"
    if enabled.exists() or enabled.is_symlink():
        print("note: depthd is still enabled: run `systemctl disable --now depthd` first", file=out)
    if unit_path.exists():
        unit_path.unlink()
        print(f"removed {unit_path}", file=out)
    if config_path.exists():
        if config_path.read_text() == shipped_file("depthd.yaml").read_text():
            config_path.unlink()
            print(f"removed {config_path}", file=out)
            try:
                config_path.parent.rmdir()
            except OSError:
                pass
        else:
            print(f"kept {config_path}: it was edited", file=out)
    print("then: systemctl daemon-reload", file=out)
    return 0
