"""Every built-in dataset: what it is, its licence, its canonical public source, its checksum, and where
this machine has it.

Data are found under one layout (the paths below, e.g. ``truthfulqa/data/v1/TruthfulQA.csv``), searched in
these roots, first match wins:

1. ``$LOCAUDIT_DATA`` (the one variable for data; ``$LOCAUDIT_SHARED_DATA``, its old name, still works
   with a deprecation warning);
2. the repository's sibling folder ``../shared/data`` (a source checkout beside the shared data);
3. the cache, ``$LOCAUDIT_CACHE/data`` (default ``~/.cache/locaudit/data``), where ``locaudit data get``
   puts what it downloads.

``locaudit data`` lists them; ``locaudit data get NAME`` downloads a dataset (or a group: truthfulqa, caa,
rome, all) from its source into the cache and checks its sha256. Sources are pinned to a commit where the
host allows it, and the checksum is that of the bytes locaudit was developed and tested on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from locaudit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ENV = "LOCAUDIT_DATA"
OLD_ENV = "LOCAUDIT_SHARED_DATA"  # deprecated name, still read

TQA = "https://raw.githubusercontent.com/sylinrl/TruthfulQA/d71c110897f5d31c5d7f309e7bc316c152f6f031"
CAA = "https://raw.githubusercontent.com/nrimsky/CAA/main"
ROME = "https://raw.githubusercontent.com/kmeng01/rome/448f8fe556cf267e0b71d02a9f3b4dec9858ec58"
TQA_LICENCE = "Apache-2.0"
CAA_LICENCE = "MIT"
ANTHROPIC_EVALS = "MIT (CAA); items from Anthropic model-written-evals, CC-BY-4.0 (attribution required)"


@dataclass(frozen=True)
class Dataset:
    """One file of a built-in dataset."""

    name: str
    group: str
    path: str  # relative to a data root
    url: str  # canonical public source
    sha256: str
    size: int
    licence: str
    description: str


def _tqa(name: str, rel: str, sha: str, size: int, desc: str) -> Dataset:
    return Dataset(name, "truthfulqa", f"truthfulqa/{rel}", f"{TQA}/{rel}", sha, size, TQA_LICENCE, desc)


_DATASETS = [
    _tqa("truthfulqa", "TruthfulQA.csv", "b8d8ef1e12f98b4f2a9f47abc9765da0640b182b6c5d9b92f0c1a1f2f1e02e5c", 503550,
         "TruthfulQA, Jan-2025 version (790 questions, Best Incorrect Answer column)"),
    _tqa("truthfulqa-mc", "data/mc_task.json", "c90d853454fd48c676accb33e16923ac438dbb6fb37ecc7c6a70e33c9e556e87",
         744411, "TruthfulQA MC0/MC1/MC2 targets, Jan-2025 version (790)"),
    _tqa("truthfulqa-v1", "data/v1/TruthfulQA.csv", "f9bd9e859cc102cb1f647f1064da7e009be752c416845cf9fa56e6eaae403a7d",
         476230, "TruthfulQA v1 (Oct 2021, 817 questions; the version ITI used)"),
    _tqa("truthfulqa-v1-mc", "data/v1/mc_task.json", "b3799639bc76c939836d587de7d30b48d91012cb34be04806d33106ce06c162a",
         755456, "TruthfulQA v1 MC1/MC2 targets (817)"),
    _tqa("truthfulqa-v0", "data/v0/TruthfulQA.csv", "8d7dd15f033196140f032d97d30f037da7a7b1192c3f36f9937c1850925335a2",
         443723, "TruthfulQA v0 (Sep 2021, 817; what the hub's truthful_qa 'generation' loads)"),
    _tqa("truthfulqa-v0-mc", "data/v0/mc_task.json", "6eb4125d25750c0145c4be2dce00440736684ab6f74ce6bff2139571cc758954",
         710607, "TruthfulQA v0 MC targets (= the hub's truthful_qa 'multiple_choice')"),
    _tqa("truthfulqa-judge-truth", "data/finetune_truth.jsonl",
         "8e81d9f0dc592e26fb0d37106126e489d39ac75099828b1f2c8142f3ede60c6b", 3576095,
         "judge training data: 22,434 answers labelled true / not true (GPT-judge's)"),
    _tqa("truthfulqa-judge-info", "data/finetune_info.jsonl",
         "b8e00e379f3aefcdb01b93886e67e0991ca90b5fdd389c0be4be2f5f00c07ec3", 3651989,
         "judge training data: 22,434 answers labelled informative / not (GPT-info's)"),
    Dataset("known_1000", "rome", "rome/known_1000.json", f"{ROME}/counterfact/compiled/known_1000.json",
            "61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a", 343229, "MIT",
            "ROME's known facts (1209 records; also at https://rome.baulab.info/data/dsets/known_1000.json)"),
]

# CAA behaviours: (generate, test A/B, test open-ended) sha256 and sizes; licence by origin (nrimsky/CAA README)
_CAA = {
    "coordinate-other-ais": ("643717af88eeef37468ceb9f80322b1ebdb4e3934a114a79fc9b930105d6ac71", 138017,
                             "9f315149225f1c1daeb65a684eca097f884b87a153d1ed8ce2c2c15abe5fae23", 18265,
                             "170b7aa95ac6650a69eba281892ae486e34c4dc03265025abed3a5fc34a11f78", 11827, ANTHROPIC_EVALS),
    "corrigible-neutral-HHH": ("c93d4d8db72ab1de875b79367d08e00b3ba27675480d4315fd942bf676359893", 96228,
                               "847759b4daf48b7d941f08a213ed7095414d1a3063354eb4ebe1dfffc4522cd0", 16541,
                               "65f8a9bd2bb9fd2d31deb1a2699b7c7ec47de1c040aae8c4938beffebacf3a50", 9391, ANTHROPIC_EVALS),
    "hallucination": ("11dfb47cee064d037b9c66a1e56da6dfb9257f5c53bc29a4310c83a45de1bfe3", 783593,
                      "aca893768df46b7fb4a546b220fab327a58fd77dedcb49210b396bd24efe7dc6", 39851,
                      "f89d149f24eea3be3caf5e6fa32ea7b31f25798666062489374316b2b303b3ae", 11212, CAA_LICENCE),
    "myopic-reward": ("3ae9dc68fc4a6f3dbc441ef9956e543b5c7a5a5d97a3cc770f1942477f212b7e", 324646,
                      "5a7446706263e4bb67965fa48a3beb433cede5476ac735b0e2d26dd7e155d2fe", 16982,
                      "3129eef01e2e7da60648839920dc09a8826fa18948af3c1153750edf57baadb3", 8997, ANTHROPIC_EVALS),
    "refusal": ("966f6f32d5c2246579a1d9b544c082790fec6067d4efea6c6ef755c9d0a154a4", 159565,
                "982838b5429f1389a36fcf59c40ddb7eb4e462cfa1464d7857b8629cd384321b", 19829,
                "285e4526971c78afd1af372932be1396577424761056ede8a33983403a4b618d", 3823, CAA_LICENCE),
    "survival-instinct": ("249a1807e6938223e66795cdd7a7212340d8612aa9bb185947669135b052697a", 325060,
                          "750a96d7864c864b39168efed636cd79289bad6746024922a7367ccc171f951f", 18683,
                          "9b660b7d0ef3ab32ba64f7967100a416f4b9fffe50571fe36a4d0679e0a213af", 10588, ANTHROPIC_EVALS),
    "sycophancy": ("1394c959d97ffae28fe9df71ce07a402c13c9333159307a28bd664fbe355b8b0", 871127,
                   "96391f0468cadb5214c34dff9f614be6725699d9f395387f8a9b6ca630d9cb77", 43426,
                   "6182d58715f29ee38be7427cbcc9da0a9b9c8a09d3f1fda17809e724e062611d", 6662, ANTHROPIC_EVALS),
}
for _b, (_g, _gs, _t, _ts, _o, _os, _lic) in _CAA.items():
    for _name, _rel, _sha, _size, _what in (
            (f"caa-{_b}", f"datasets/generate/{_b}/generate_dataset.json", _g, _gs, "A/B items to steer with"),
            (f"caa-test-{_b}", f"datasets/test/{_b}/test_dataset_ab.json", _t, _ts, "A/B test items"),
            (f"caa-open-{_b}", f"datasets/test/{_b}/test_dataset_open_ended.json", _o, _os, "open-ended test questions")):
        _DATASETS.append(Dataset(_name, "caa", f"caa/{_rel}", f"{CAA}/{_rel}", _sha, _size, _lic, f"CAA {_b}: {_what}"))

DATASETS: dict[str, Dataset] = {d.name: d for d in _DATASETS}
GROUPS: dict[str, list[str]] = {}
for _d in _DATASETS:
    GROUPS.setdefault(_d.group, []).append(_d.name)
GROUPS["all"] = list(DATASETS)


# ---------------------------------------------------------------------------------------------- where
def repo_sibling() -> Path:
    """The shared data folder beside a source checkout: <repository>/../shared/data."""
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def cache_root() -> Path:
    """Where `locaudit data get` writes: $LOCAUDIT_CACHE/data (not created here)."""
    root = os.environ.get("LOCAUDIT_CACHE") or str(Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")))
                                                  / "locaudit")
    return Path(root) / "data"


def env_root() -> tuple[str, Path] | None:
    """($VAR, folder) of the data variable: LOCAUDIT_DATA, else the deprecated LOCAUDIT_SHARED_DATA (warned)."""
    val = os.environ.get(ENV)
    if val:
        return ENV, Path(val).expanduser()
    old = os.environ.get(OLD_ENV)
    if old:
        warnings.warn(f"{OLD_ENV} is deprecated: set {ENV}={old} instead (the one variable for data)",
                      DeprecationWarning, stacklevel=3)
        log.warning("%s is deprecated: set %s instead", OLD_ENV, ENV)
        return OLD_ENV, Path(old).expanduser()
    return None


def roots() -> list[tuple[str, Path]]:
    """(where, folder) searched in order: the variable, the repository's sibling, the cache."""
    out = []
    env = env_root()
    if env is not None:
        out.append((f"${env[0]}", env[1]))
    out.append(("../shared/data", repo_sibling()))
    out.append(("cache", cache_root()))
    return out


def default_root() -> Path | None:
    """The first data root that exists (what ${LOCAUDIT_DATA} means in a study file when it is unset)."""
    for where, root in roots():
        if root.is_dir() and (where != "cache" or any(root.iterdir())):
            return root
    return None


@dataclass
class Found:
    dataset: Dataset
    path: Path | None  # None: not on this machine
    where: str | None
    status: str  # "ok", "checksum mismatch", "missing", "unchecked"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset(name: str) -> Dataset:
    if name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(name, [*DATASETS, *GROUPS], n=3)
        raise ConfigError(f"dataset {name!r} is not built in; `locaudit data` lists them"
                          + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    return DATASETS[name]


def locate(name: str | Dataset, verify: bool = True) -> Found:
    """Where this machine has a dataset: the first root holding its file (checked against its sha256)."""
    d = name if isinstance(name, Dataset) else dataset(name)
    for where, root in roots():
        p = root / d.path
        if p.is_file():
            status = ("ok" if sha256_of(p) == d.sha256 else "checksum mismatch") if verify else "unchecked"
            return Found(d, p, where, status)
    return Found(d, None, None, "missing")


def path(name: str) -> Path:
    """The local file of a built-in dataset, or a DataError saying how to get it."""
    f = locate(name, verify=False)
    if f.path is None:
        raise DataError(f"dataset {name!r} ({f.dataset.path}) is not on this machine: looked in "
                        f"{', '.join(f'{w} ({r})' for w, r in roots())}; get it with `locaudit data get {name}` "
                        f"or set {ENV} to a folder holding {f.dataset.path}")
    return f.path


def expand(names: list[str]) -> list[Dataset]:
    """Dataset names and group names (truthfulqa, caa, rome, all) -> datasets, each once, in order. A group
    wins over its namesake dataset: `truthfulqa` is every TruthfulQA file."""
    out: dict[str, Dataset] = {}
    for n in names:
        for m in GROUPS.get(n, [n]):
            out[m] = dataset(m)
    return list(out.values())


# ---------------------------------------------------------------------------------------------- get
def fetch(d: Dataset, url_base: str | None = None, force: bool = False, timeout: float = 60.0) -> Found:
    """Download one dataset into the cache (from `url_base`/PATH when given, a mirror of the data layout;
    else its canonical source), check its sha256, and move it into place. An existing good copy anywhere
    is kept unless `force`. A checksum mismatch leaves nothing behind and raises DataError."""
    if not force:
        have = locate(d)
        if have.status == "ok":
            return have
    url = f"{url_base.rstrip('/')}/{d.path}" if url_base else d.url
    target = cache_root() / d.path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.locaudit-tmp-{os.getpid()}")
    h = hashlib.sha256()
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    h.update(chunk)
                    f.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise DataError(f"dataset {d.name!r}: cannot download {url} ({type(e).__name__}: {reason}); "
                            f"offline, put the file at {target} or set {ENV} to a folder holding {d.path}") from None
        got = h.hexdigest()
        if got != d.sha256:
            raise DataError(f"dataset {d.name!r}: {url} has sha256 {got}, expected {d.sha256} ({tmp.stat().st_size} "
                            f"bytes, expected {d.size}): a changed or corrupted file; nothing was written")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return Found(d, target, "cache", "ok")
