"""`depthd install-service` / `uninstall-service`: put the systemd unit and the example config in place.

The unit is systemd/depthd.service with ExecStart pointing at the `depthd` of the
environment this command runs from, so the service runs the daemon that was installed
(its venv), not whatever is first on PATH.
"""

from __future__ import annotations

import grp
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

UNIT_PATH = Path("etc/systemd/system/depthd.service")
CONFIG_PATH = Path("etc/depthd/depthd.yaml")
CONFIG_IN_UNIT = "/etc/depthd/depthd.yaml"
UNREACHABLE = ("/root/", "/home/", "/tmp/", "/var/tmp/")
"""Where the service cannot run a program from: ProtectHome= hides homes (and /root is private
anyway), PrivateTmp= gives it an empty /tmp."""
SOCKET_GROUP = "depthd"
"""The group of the daemon's unix socket: users added to it may use the daemon."""
DEVICE_GROUPS = ("video", "render")
"""Groups owning GPU nodes (Jetson's /dev/nvhost-*, /dev/dri); written only where they exist."""


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
    create_group: bool
    """Whether the socket's group must be created first."""
    notes: tuple[str, ...] = ()
    problem: str | None = None
    """Why the unit cannot work; a real install is then refused (a dry run and --prefix warn)."""


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


DYNAMIC_IDS = range(61184, 65520)
"""systemd's dynamic users and groups: they exist only while their unit runs."""


def group_exists(name: str) -> bool:
    """Whether a lasting group `name` exists (a running unit's dynamic group does not count)."""
    try:
        return grp.getgrnam(name).gr_gid not in DYNAMIC_IDS
    except KeyError:
        return False


def dynamic_group(name: str) -> bool:
    """Whether `name` is, for now, a running unit's dynamic group (an older depthd's)."""
    try:
        return grp.getgrnam(name).gr_gid in DYNAMIC_IDS
    except KeyError:
        return False


def unreachable(runtime: list[Path]) -> str | None:
    """Why the service could not run a unit whose ExecStart needs `runtime` (203/EXEC, or files
    under PrivateTmp), or None."""
    hidden = sorted({str(path) for path in runtime if (str(path).rstrip("/") + "/").startswith(UNREACHABLE)})
    if not hidden:
        return None
    return (
        f"{', '.join(hidden)} {'is' if len(hidden) == 1 else 'are'} where the service cannot reach "
        "(a home, /root or /tmp: ProtectHome= and PrivateTmp= hide them from it, and it would fail with "
        "203/EXEC). Install depthd, and the Python it runs on, in /opt/depthd instead: sudo git clone "
        "<this repository> /opt/depthd && sudo /opt/depthd/scripts/setup && sudo /opt/depthd/.venv/bin/depthd "
        "install-service"
    )


def render_unit(template: str, command: str, groups: list[str]) -> str:
    """The unit for `command`, with the supplementary groups (`groups`) that exist on this system."""
    unit = re.sub(r"^ExecStart=.*$", f"ExecStart={command} serve --config {CONFIG_IN_UNIT}", template, count=1, flags=re.M)
    return re.sub(r"^SupplementaryGroups=.*$", f"SupplementaryGroups={' '.join(groups)}", unit, count=1, flags=re.M)


def install_plan(prefix: Path) -> InstallPlan:
    problem = unreachable([Path(sys.prefix), Path(sys.executable).resolve()])
    groups = [name for name in DEVICE_GROUPS if group_exists(name)]
    notes = [f"no {name!r} group on this system: left out of SupplementaryGroups="
             for name in DEVICE_GROUPS if not group_exists(name)]
    if problem:
        notes.insert(0, f"WARNING: this unit cannot work: {problem}")
    create_group = not group_exists(SOCKET_GROUP)
    if create_group and prefix != Path("/"):
        notes.append(f"the unit needs the system group {SOCKET_GROUP!r}: create it on the target "
                     f"(groupadd --system {SOCKET_GROUP})")
    config_path = prefix / CONFIG_PATH
    return InstallPlan(
        unit_path=prefix / UNIT_PATH,
        unit=render_unit(shipped_file("depthd.service").read_text(), daemon_command(), groups),
        config_path=config_path,
        config=shipped_file("depthd.yaml").read_text(),
        write_config=not config_path.exists(),
        create_group=create_group and prefix == Path("/"),
        notes=tuple(notes),
        problem=problem,
    )


def install(prefix: Path = Path("/"), dry_run: bool = False, out=None) -> int:
    out = out or sys.stdout
    if not dry_run and prefix == Path("/") and os.geteuid() != 0:
        raise InstallError("writing /etc needs root: run it with sudo (or see --dry-run and --prefix)")
    steps = install_plan(prefix)
    if steps.problem and not dry_run and prefix == Path("/"):
        raise InstallError(steps.problem)
    if steps.create_group and dynamic_group(SOCKET_GROUP) and not dry_run:
        raise InstallError(
            f"a running depthd's dynamic group hides the name {SOCKET_GROUP!r}: stop it first "
            "(systemctl stop depthd), then run install-service again"
        )
    if dry_run:
        if steps.create_group:
            print(f"# would run: groupadd --system {SOCKET_GROUP}", file=out)
        print(f"# {steps.unit_path}\n{steps.unit}", file=out)
        if steps.write_config:
            print(f"# {steps.config_path}\n{steps.config}", file=out)
        else:
            print(f"# {steps.config_path} exists and is kept", file=out)
    else:
        if steps.create_group:
            subprocess.run(["groupadd", "--system", SOCKET_GROUP], check=True)
            print(f"created the group {SOCKET_GROUP} (add a user to it to let it use the socket: "
                  f"usermod -aG {SOCKET_GROUP} USER)", file=out)
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
        if note.startswith("WARNING"):
            print(note, file=sys.stderr)
        else:
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
