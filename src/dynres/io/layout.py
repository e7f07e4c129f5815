"""Scan layouts: named progressive-JPEG scan scripts in jpegtran's ``-scans`` syntax, checked to be lossless.

A store's *layout* is the order in which its files send their DCT coefficients: which components, which zigzag band
(``Ss-Se``) and which bit planes (successive approximation: ``Ah`` the bit position sent before, ``Al`` the one sent
down to) each scan carries. The coefficients do not change, so every layout decodes a full read to the same pixels;
what changes is what a prefix of k scans holds, i.e. what a read policy can stop at. :mod:`dynres.study.layout` scores
the candidates here by the backbone's accuracy per byte; ``dynres ingest --scans FILE`` applies one.

Decisions:

- A script is checked against libjpeg's own rules (``jcmaster.c`` ``validate_script``: DC before AC, one component
  per AC scan, ``Al = Ah - 1`` in refinements, ``Ah`` equal to the bit position the coefficient last reached) and,
  beyond them, for completeness: every coefficient of every component must reach bit 0, or a transcode silently
  drops bits (libjpeg accepts such a script).
- Scripts are written for colour (component 0 = Y, 1 = Cb, 2 = Cr). jpegtran refuses a script that names a component
  an image lacks, so a grayscale JPEG gets the script's *gray companion*: the same scans restricted to component 0
  (:meth:`ScanScript.gray`; for libjpeg's colour default that is exactly libjpeg's grayscale default).
- A script's identity is its scans, not its text: :attr:`ScanScript.sha256` hashes the canonical form, so comments
  and spacing do not change it; the name travels in a ``# dynres scan script: NAME`` comment, which jpegtran skips.
- Custom scripts need libjpeg-turbo's ``jpegtran`` (Pillow cannot set a scan script; mozjpeg's ``jpegtran`` has
  another default): :func:`require_jpegtran` fails with a clear message where it is missing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dynres.errors import BadImageError, ConfigError
from dynres.io.jpeg import SOI

LIBJPEG = "libjpeg"  # the candidate equal to libjpeg's default script (what ingest writes without --scans)
DEFAULT_LAYOUT = "libjpeg default"  # what a store ingested without --scans records
MAX_AH_AL = 10  # libjpeg's limit on the successive-approximation bit positions of 8-bit samples
_NAME_COMMENT = "# dynres scan script:"
_SCAN = re.compile(r"^\s*([0-9][0-9\s,]*):\s*([0-9]+)\s*-\s*([0-9]+)\s*,\s*([0-9]+)\s*,\s*([0-9]+)\s*$")


@dataclass(frozen=True)
class Scan:
    """One scan: the components it carries, its zigzag band ``ss..se`` and bit positions ``ah`` → ``al``."""

    components: tuple[int, ...]
    ss: int
    se: int
    ah: int
    al: int

    def text(self) -> str:
        """The scan as one line of a jpegtran scan script."""
        return f"{','.join(map(str, self.components))}: {self.ss}-{self.se}, {self.ah}, {self.al};"


@dataclass(frozen=True)
class ScanScript:
    """A named, validated scan script for images of ``components`` (3: YCbCr, 1: grayscale) components."""

    name: str
    scans: tuple[Scan, ...]
    note: str = field(default="", compare=False)  # what the script is for (a comment in its file)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(self.name or "scan script", "a script name is letters, digits, '.', '_' and '-'")
        validate_scans(self.scans, self.name)

    @property
    def components(self) -> int:
        return 1 + max(c for scan in self.scans for c in scan.components)

    def body(self) -> str:
        """The scans alone, one per line: what the hash covers."""
        return "\n".join(scan.text() for scan in self.scans) + "\n"

    def text(self) -> str:
        """The script file's text: the name (and note) as comments, then the scans."""
        note = f"# {self.note}\n" if self.note else ""
        return f"{_NAME_COMMENT} {self.name}\n{note}{self.body()}"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body().encode()).hexdigest()

    @property
    def ident(self) -> str:
        """A stable name for records and file names: the name and the first 12 hex digits of the hash."""
        return f"{self.name}-{self.sha256[:12]}"

    def gray(self) -> ScanScript:
        """The same scans restricted to component 0 (scans left empty dropped): for one-component JPEGs."""
        scans = tuple(Scan((0,), s.ss, s.se, s.ah, s.al) for s in self.scans if 0 in s.components)
        return ScanScript(f"{self.name}.gray", scans, self.note)

    def for_components(self, components: int) -> ScanScript:
        """This script for images of ``components`` components (1: :meth:`gray`)."""
        if components == self.components:
            return self
        if components == 1:
            return self.gray()
        raise ConfigError(self.name, f"a script for {self.components} components cannot store a "
                                     f"{components}-component JPEG")

    def write(self, path: str | os.PathLike) -> Path:
        """Write the script file (atomically) and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(self.text())
        os.replace(tmp, path)
        return path


def validate_scans(scans: tuple[Scan, ...], name: str = "scan script") -> None:
    """ConfigError naming ``name`` unless ``scans`` is a progressive script libjpeg accepts *and* that sends every
    coefficient of every component down to bit 0 (lossless)."""
    if not scans:
        raise ConfigError(name, "no scans")
    n = 1 + max((c for s in scans for c in s.components), default=-1)
    if n not in (1, 3):
        raise ConfigError(name, f"scripts are for 1 (gray) or 3 (YCbCr) components; this one names {n}")
    bits = [[-1] * 64 for _ in range(n)]  # per component and coefficient: the bit position reached (-1: not sent)
    for i, s in enumerate(scans, 1):
        where = f"scan {i} ({s.text()})"
        if not s.components or list(s.components) != sorted(set(s.components)) or min(s.components) < 0:
            raise ConfigError(name, f"{where}: components must be distinct and increasing")
        if not 0 <= s.ss <= s.se <= 63 or (s.ss == 0 and s.se != 0):
            raise ConfigError(name, f"{where}: a band is 0-0 (DC) or within 1-63 (AC)")
        if s.ss > 0 and len(s.components) != 1:
            raise ConfigError(name, f"{where}: an AC scan carries exactly one component")
        if not (0 <= s.al <= MAX_AH_AL and 0 <= s.ah <= MAX_AH_AL) or (s.ah and s.al != s.ah - 1):
            raise ConfigError(name, f"{where}: bit positions must be 0..{MAX_AH_AL} and a refinement has Al = Ah - 1")
        for c in s.components:
            if s.ss > 0 and bits[c][0] < 0:
                raise ConfigError(name, f"{where}: component {c}'s AC coefficients come before its DC")
            for k in range(s.ss, s.se + 1):
                if (bits[c][k] < 0 and s.ah != 0) or (bits[c][k] >= 0 and s.ah != bits[c][k]):
                    raise ConfigError(name, f"{where}: coefficient {k} of component {c} is at bit "
                                            f"{bits[c][k] if bits[c][k] >= 0 else 'none'}, not Ah={s.ah}")
                bits[c][k] = s.al
    for c in range(n):
        short = [k for k in range(64) if bits[c][k] != 0]
        if short:
            raise ConfigError(name, f"component {c}'s coefficients {_ranges(short)} never reach bit 0: a transcode "
                                    "with this script would drop them (not lossless)")


def _ranges(values: list[int]) -> str:
    out, start = [], values[0]
    for a, b in zip(values, values[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def parse_script(text: str, name: str | None = None) -> ScanScript:
    """A script from jpegtran ``-scans`` text (``comps: Ss-Se, Ah, Al;`` entries, ``#`` comments). Its name is
    ``name``, else the ``# dynres scan script: NAME`` comment, else "custom"."""
    found = None
    lines = []
    for line in text.splitlines():
        if line.strip().startswith(_NAME_COMMENT):
            found = line.strip()[len(_NAME_COMMENT):].strip()
        lines.append(line.split("#", 1)[0])
    scans = []
    for entry in " ".join(lines).split(";"):
        if not entry.strip():
            continue
        match = _SCAN.match(entry)
        if match is None:
            raise ConfigError(name or found or "scan script",
                              f"cannot read scan {entry.strip()!r}: write 'components: Ss-Se, Ah, Al;'")
        comps = tuple(int(c) for c in match.group(1).replace(",", " ").split())
        scans.append(Scan(comps, *(int(match.group(g)) for g in range(2, 6))))
    return ScanScript(name or found or "custom", tuple(scans))


def read_script(path: str | os.PathLike) -> ScanScript:
    """A script file, validated (ConfigError naming the file)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(path, f"cannot read the scan script: {err}") from None
    try:
        return parse_script(text)
    except ConfigError as err:
        raise ConfigError(path, err.reason) from None


def _script(name: str, note: str, text: str) -> ScanScript:
    return ScanScript(name, parse_script(text, name).scans, note)


CANDIDATES: dict[str, ScanScript] = {s.name: s for s in (
    _script(LIBJPEG, "libjpeg's default (jcparam.c jpeg_simple_progression): what jpegtran -progressive writes",
            "0,1,2: 0-0,0,1; 0: 1-5,0,2; 2: 1-63,0,1; 1: 1-63,0,1; 0: 6-63,0,2; 0: 1-63,2,1;"
            "0,1,2: 0-0,1,0; 2: 1-63,1,0; 1: 1-63,1,0; 0: 1-63,1,0;"),
    _script("libjpeg-split", "libjpeg's order; the two luma AC refinements split into zigzag bands (more steps)",
            "0,1,2: 0-0,0,1; 0: 1-5,0,2; 2: 1-63,0,1; 1: 1-63,0,1; 0: 6-63,0,2; 0: 1-9,2,1; 0: 10-63,2,1;"
            "0,1,2: 0-0,1,0; 2: 1-63,1,0; 1: 1-63,1,0; 0: 1-9,1,0; 0: 10-27,1,0; 0: 28-63,1,0;"),
    _script("sa-planes", "luma AC in four bit planes, chroma AC in three: every frequency coarser first",
            "0,1,2: 0-0,0,1; 0: 1-5,0,3; 0: 6-63,0,3; 2: 1-63,0,2; 1: 1-63,0,2; 0: 1-63,3,2; 0,1,2: 0-0,1,0;"
            "2: 1-63,2,1; 1: 1-63,2,1; 0: 1-63,2,1; 2: 1-63,1,0; 1: 1-63,1,0; 0: 1-63,1,0;"),
    _script("sa-planes-split", "sa-planes with the last two luma bit planes split into bands 1-9 and 10-63",
            "0,1,2: 0-0,0,1; 0: 1-5,0,3; 0: 6-63,0,3; 2: 1-63,0,2; 1: 1-63,0,2; 0: 1-63,3,2; 0,1,2: 0-0,1,0;"
            "2: 1-63,2,1; 1: 1-63,2,1; 0: 1-9,2,1; 0: 10-63,2,1; 2: 1-63,1,0; 1: 1-63,1,0; 0: 1-9,1,0;"
            "0: 10-63,1,0;"),
    _script("chroma-late", "libjpeg's luma scans first (down to bit 1), chroma AC after them",
            "0,1,2: 0-0,0,1; 0: 1-5,0,2; 0: 6-63,0,2; 0: 1-63,2,1; 2: 1-63,0,1; 1: 1-63,0,1; 0,1,2: 0-0,1,0;"
            "0: 1-63,1,0; 2: 1-63,1,0; 1: 1-63,1,0;"),
    _script("spectral", "DC first at full precision, then luma AC in zigzag bands, chroma later, no successive "
            "approximation (shared/REFERENCE.md: best by SSIM, worse for the backbone)",
            "0,1,2: 0-0,0,0; 0: 1-2,0,0; 0: 3-5,0,0; 0: 6-9,0,0; 0: 10-14,0,0; 1: 1-9,0,0; 2: 1-9,0,0;"
            "0: 15-20,0,0; 0: 21-27,0,0; 0: 28-35,0,0; 0: 36-44,0,0; 0: 45-63,0,0; 1: 10-63,0,0; 2: 10-63,0,0;"),
    _script("luma-last", "deliberately bad: DC and chroma first, luma AC last at full precision in one scan",
            "0,1,2: 0-0,0,0; 1: 1-63,0,0; 2: 1-63,0,0; 0: 1-63,0,0;"),
)}
# what `dynres layout` tries by default: libjpeg's and the finer ones, plus the spectral one as a known-worse check
DEFAULT_CANDIDATES = (LIBJPEG, "libjpeg-split", "sa-planes", "sa-planes-split", "chroma-late", "spectral")


def candidate(name_or_path: str) -> ScanScript:
    """A named candidate of :data:`CANDIDATES`, or a script file."""
    if name_or_path in CANDIDATES:
        return CANDIDATES[name_or_path]
    if os.path.isfile(name_or_path):
        return read_script(name_or_path)
    raise ConfigError(name_or_path, f"neither a scan-script file nor a candidate ({', '.join(CANDIDATES)})")


def is_libjpeg_default(script: ScanScript) -> bool:
    """Whether ``script`` sends exactly libjpeg's default scans (for its number of components)."""
    return script.scans == CANDIDATES[LIBJPEG].for_components(script.components).scans


def require_jpegtran() -> str:
    """The path of libjpeg-turbo's ``jpegtran``, or ConfigError saying how to get it: custom scan scripts need it."""
    from dynres.io.transcode import is_libjpeg_turbo

    path = shutil.which("jpegtran")
    if path is None or not is_libjpeg_turbo(path):
        found = f"the jpegtran at {path} is not libjpeg-turbo's" if path else "no jpegtran on PATH"
        raise ConfigError("jpegtran", f"a custom scan script needs libjpeg-turbo's jpegtran ({found}); install "
                                      "libjpeg-turbo-progs (Debian) or libjpeg-turbo, or keep libjpeg's default layout")
    return path


def gray_script_file(path: str | os.PathLike) -> str:
    """A file holding the gray companion of the script at ``path`` (written once per script content, in the
    temporary folder), for jpegtran to store a one-component JPEG with."""
    script = read_script(path).for_components(1)
    out = Path(tempfile.gettempdir()) / "dynres-scans" / f"{script.ident}.txt"
    if not out.is_file():
        script.write(out)
    return str(out)


def script_for_source(scans: str | None, source: bytes) -> str | None:
    """The script file to transcode the JPEG ``source`` with: ``scans`` itself, or its gray companion for a
    one-component JPEG (None stays None: libjpeg's default handles both)."""
    from dynres.io.transcode import read_frame

    if scans is None or source[:2] != SOI:
        return scans
    try:
        components = len(read_frame(source).sampling)
    except BadImageError:
        return scans  # the transcoder reports the unreadable header
    if components != 1 or read_script(scans).components == 1:
        return scans
    return gray_script_file(scans)


def store_layout(scans: str | None, transcoder: str | None) -> dict:
    """What a store records as its layout: the script's name and hash, or libjpeg's default (mozjpeg's own script
    where that transcoded the JPEG sources)."""
    if scans is not None:
        script = read_script(scans)
        return {"name": script.name, "sha256": script.sha256, "script": script.body(),
                "libjpeg_default": is_libjpeg_default(script)}
    if transcoder == "mozjpeg":
        return {"name": "mozjpeg default (JPEG sources; re-encoded images: libjpeg default)", "sha256": None,
                "script": None, "libjpeg_default": False}
    return {"name": DEFAULT_LAYOUT, "sha256": CANDIDATES[LIBJPEG].sha256, "script": None, "libjpeg_default": True}


def describe_layout(layout: dict | None) -> str:
    """A store's recorded layout (:attr:`dynres.io.store.Store.layout`) in words, for a log line."""
    if layout is None:
        return "not recorded (ingested before dynres recorded layouts: libjpeg's default unless --scans was given)"
    digest = f" ({layout['sha256'][:12]})" if layout.get("sha256") else ""
    same = " = libjpeg's default" if layout.get("libjpeg_default") and layout["name"] != DEFAULT_LAYOUT else ""
    return f"{layout['name']}{digest}{same}"
