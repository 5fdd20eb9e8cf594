"""Shipping a workdir to the nodes safely: what goes, what never goes, and only once per content.

    bundle = collect_workdir(Path("~/proj"))     # refusals (home dir, secrets, too big) before anything moves
    print(bundle.describe())                     # "shipping 12 files, 48.1 KB from /home/me/proj"
    ship_bundle(cluster, nodes, bundle)          # uploaded where its content hash is not there yet

What goes: every file under the workdir that `.gitignore` files (nested, as git reads them,
plus `.git/info/exclude`) and `.gpuforgeignore` files (same syntax) do not exclude; `.git`, caches
and virtualenvs never. What never goes, whatever the ignore files say: a home directory (or a folder
that holds one), `.ssh`, `.aws`, `.config/gcloud`, `.env` files and private keys: when one of them
would be shipped, the shipment is refused with their names. Past the size limit it is refused with
the biggest entries named. On the node the code lands in `<workdir>/code/<hash>/`, so unchanged
code is not shipped again; every run gets its own copy of it.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pathspec

from workloads.errors import ConfigError

DEFAULT_LIMIT_MB = 100.0  # a code folder; datasets belong in storage (a bigger workdir usually ships data by mistake)
ALWAYS_SKIPPED = (".git", ".hg", ".svn", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints")
SENSITIVE_DIRS = (".ssh", ".aws", ".gnupg", ".azure", ".kube", ".docker")  # credentials folders, anywhere in the tree
SENSITIVE_PATHS = (".config/gcloud",)
KEY_NAMES = ("id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "id_ecdsa_sk", "id_ed25519_sk")
KEY_SUFFIXES = (".pem", ".key", ".p12", ".pfx", ".ppk")
PRIVATE_KEY_MARK = b"PRIVATE KEY-----"  # PEM and OpenSSH private keys carry it in their first line
SNIFF_BYTES = 256
BIGGEST_SHOWN = 5


@dataclass
class Bundle:
    root: Path
    files: list[tuple[str, int]]  # (relative posix path, size), sorted
    digest: str = ""
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        return f"shipping {len(self.files)} file(s), {human(self.total_bytes)} from {self.root}"

    def archive(self) -> Path:
        """A tar.gz of the files in a temp file (the caller removes it)."""
        handle = tempfile.NamedTemporaryFile(prefix="gpuforge-code-", suffix=".tar.gz", delete=False)
        with handle, tarfile.open(fileobj=handle, mode="w:gz") as tar:
            for rel, _ in self.files:
                info = tar.gettarinfo(str(self.root / rel), arcname=rel)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(self.root / rel, "rb") as f:
                    tar.addfile(info, f)
        return Path(handle.name)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def refuse_home(root: Path) -> None:
    home = Path.home().resolve()
    homes = {home, Path("/root"), Path("/home")}
    for h in homes:
        if root == h or (h != Path("/") and h.is_relative_to(root)):
            raise ConfigError(f"refusing to ship {root}: it is (or holds) a home directory, which has your keys and "
                              "credentials; put the code in its own folder and point `workdir:` (or --script) there")
    if root == Path("/"):
        raise ConfigError("refusing to ship / (the whole machine)")


def read_spec(path: Path) -> pathspec.PathSpec | None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    return pathspec.GitIgnoreSpec.from_lines(lines)


def is_venv(path: Path) -> bool:
    return (path / "pyvenv.cfg").is_file()


def collect_workdir(root: Path, limit_mb: float = DEFAULT_LIMIT_MB) -> Bundle:
    """The files to ship from `root` (see the module docstring); ConfigError for what must not go."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"workdir {root} is not a folder")
    refuse_home(root)
    rules: list[tuple[str, pathspec.PathSpec]] = []  # (folder relative to root, spec) from outer to inner
    exclude = read_spec(root / ".git" / "info" / "exclude")
    if exclude is not None:
        rules.append(("", exclude))
    files: list[tuple[str, int]] = []
    sensitive: list[str] = []

    def ignored(rel: str, is_dir: bool) -> bool:
        verdict = False
        for base, spec in rules:  # inner files override outer ones, later lines earlier ones: git's order
            if base and not rel.startswith(base + "/"):
                continue
            sub = rel[len(base) + 1 :] if base else rel
            result = spec.check_file(sub + ("/" if is_dir else ""))
            if result.include is not None:
                verdict = result.include
        return verdict

    def walk(folder: Path, rel_folder: str) -> None:
        pushed = 0
        for name in (".gitignore", ".gpuforgeignore"):
            spec = read_spec(folder / name)
            if spec is not None:
                rules.append((rel_folder, spec))
                pushed += 1
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise ConfigError(f"cannot read {folder}: {exc}") from None
        for entry in entries:
            rel = f"{rel_folder}/{entry.name}" if rel_folder else entry.name
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                if entry.name in ALWAYS_SKIPPED or is_venv(path) or ignored(rel, True):
                    continue
                if entry.name in SENSITIVE_DIRS or any(rel == p or rel.endswith("/" + p) for p in SENSITIVE_PATHS):
                    sensitive.append(rel + "/")
                    continue
                walk(path, rel)
            elif entry.is_file(follow_symlinks=True) and not ignored(rel, False):
                if is_sensitive_file(path):
                    sensitive.append(rel)
                    continue
                files.append((rel, entry.stat().st_size))
        del rules[len(rules) - pushed :]

    walk(root, "")
    if sensitive:
        shown = ", ".join(sensitive[:10]) + (f" and {len(sensitive) - 10} more" if len(sensitive) > 10 else "")
        raise ConfigError(f"refusing to ship {root}: it holds credentials that must never leave this machine: {shown}; "
                          "move them out, or list them in a .gpuforgeignore there")
    bundle = Bundle(root=root, files=files)
    if bundle.total_bytes > limit_mb * 1024 * 1024:
        raise ConfigError(f"{root} is {human(bundle.total_bytes)} in {len(files)} files, over the {limit_mb:g} MB limit; "
                          f"biggest: {biggest_entries(files)}; exclude them in a .gpuforgeignore (datasets belong in "
                          "storage), or raise the limit with --max-ship-mb")
    bundle.digest = content_digest(root, files)
    return bundle


def is_sensitive_file(path: Path) -> bool:
    name = path.name
    if name == ".env" or name.startswith(".env.") or name in KEY_NAMES:
        return True
    if name.endswith(KEY_SUFFIXES) or name.startswith("id_") or "key" in name.lower() or name.endswith(".json"):
        try:
            with open(path, "rb") as f:
                head = f.read(SNIFF_BYTES)
        except OSError:
            return False
        return PRIVATE_KEY_MARK in head or b'"private_key"' in head or name.endswith((".p12", ".pfx", ".ppk"))
    return False


def biggest_entries(files: list[tuple[str, int]]) -> str:
    """The top-level entries by size: `data/ 1.2 GB, model.bin 300.0 MB`."""
    sizes: dict[str, int] = {}
    for rel, size in files:
        top = rel.split("/", 1)[0] + ("/" if "/" in rel else "")
        sizes[top] = sizes.get(top, 0) + size
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:BIGGEST_SHOWN]
    return ", ".join(f"{name} {human(size)}" for name, size in top)


def content_digest(root: Path, files: list[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for rel, _ in files:
        mode = os.stat(root / rel).st_mode
        h.update(rel.encode() + b"\0" + (b"x" if mode & stat.S_IXUSR else b"-") + b"\0")
        with open(root / rel, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


# -- on the nodes ---------------------------------------------------------------------------------


def code_dir(node_workdir: str, digest: str) -> str:
    return f"{node_workdir}/code/{digest}"


def ship_bundle(cluster, nodes, bundle: Bundle, pool=None) -> list[bool]:
    """Put the bundle on every node that lacks it (extracted, then marked complete); per node, whether it moved."""
    from workloads.remote import on_nodes, raise_first

    archive: list[Path] = []

    def ship(conn, node) -> bool:
        target = code_dir(node.workdir, bundle.digest)
        q = shlex.quote(target)
        if conn.run(f"test -f {q}/.gpuforge-complete", hide=True, warn=True).ok:
            return False
        remote = f"{node.workdir}/code/{bundle.digest}.tar.gz"
        conn.run(f"rm -rf {q} && mkdir -p {q}", hide=True)
        conn.put(str(archive[0]), remote)
        conn.run(f"tar -xzf {shlex.quote(remote)} -C {q} --no-same-owner && rm -f {shlex.quote(remote)} "
                 f"&& touch {q}/.gpuforge-complete", hide=True)
        return True

    archive.append(bundle.archive())
    try:
        results = on_nodes(cluster, nodes, ship, pool)  # pool: open connections to reuse (workloads/remote.py)
    finally:
        archive[0].unlink(missing_ok=True)
    raise_first(results, nodes, "shipping the code")
    return results

