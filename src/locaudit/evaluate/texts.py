"""Generic English text for KL and CE: collateral damage of an edit on text it was never trained on.

ITI measures KL and CE on generic web text (OpenWebText samples). Offline, locaudit uses public-domain
fiction shipped with it or read from a Debian package (evaluate/corpora/README.md):

- `austen` (default): ~68 kB, six excerpts of Jane Austen's novels, shipped as package data.
- `austen-debian[:DIR_OR_DEB]`: the six novels in full (~4 MB) from Debian's r-cran-janeaustenr, read
  without R (evaluate/rdata.py) from the installed package, a folder, or a downloaded .deb.
- any other value: a UTF-8 text file by path (one document).

A corpus is a list of documents; each is cut into consecutive token windows (clusters of the KL/CE
standard error), prefixed with the tokenizer's BOS where it adds one.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from locaudit.errors import DataError
from locaudit.io import atomic_path, cache_dir, stable_hash

PACKAGED = {"austen": "austen.txt"}
AUSTEN_NOVELS = {"sensesensibility": "Sense and Sensibility (1811)", "prideprejudice": "Pride and Prejudice (1813)",
                 "mansfieldpark": "Mansfield Park (1814)", "emma": "Emma (1815)",
                 "northangerabbey": "Northanger Abbey (1817)", "persuasion": "Persuasion (1817)"}
DEBIAN_DIRS = ("/usr/lib/R/site-library/janeaustenr", "/usr/local/lib/R/site-library/janeaustenr",
               "/usr/lib/R/library/janeaustenr")


@dataclass(frozen=True)
class Corpus:
    """Named documents of generic text."""

    name: str
    documents: tuple[tuple[str, str], ...]  # (title, text)
    source: str

    @property
    def fingerprint(self) -> str:
        return stable_hash([list(d) for d in self.documents], 16)


def _split_headed(text: str) -> list[tuple[str, str]]:
    """Documents of a file with `=== Title ===` header lines."""
    docs, title, buf = [], None, []
    for line in text.splitlines():
        if line.startswith("=== ") and line.endswith(" ==="):
            if title is not None:
                docs.append((title, "\n".join(buf).strip()))
            title, buf = line[4:-4], []
        else:
            buf.append(line)
    if title is not None:
        docs.append((title, "\n".join(buf).strip()))
    return docs


def _paragraphs(lines: Sequence[str | None]) -> list[str]:
    paras, cur = [], []
    for line in lines:
        if line and line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return paras


def _extract_deb(deb: Path) -> Path:
    """janeaustenr's data/Rdata.{rdx,rdb} from a .deb (an ar archive holding data.tar.*), into the cache."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise DataError(f"{deb}: not a Debian package (no ar header)")
    i, data = 8, None
    while i + 60 <= len(raw):
        name, size = raw[i: i + 16].decode().strip(), int(raw[i + 48: i + 58].decode().strip())
        if name.startswith("data.tar"):
            data = raw[i + 60: i + 60 + size]
        i += 60 + size + (size % 2)
    if data is None:
        raise DataError(f"{deb}: no data.tar member")
    out = cache_dir("corpora") / f"janeaustenr-{hashlib.sha256(raw).hexdigest()[:12]}"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        found = 0
        for m in tar.getmembers():
            if m.isfile() and m.name.endswith(("/data/Rdata.rdx", "/data/Rdata.rdb")):
                f = tar.extractfile(m)
                assert f is not None
                target = out / "data" / Path(m.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as tmp:
                    Path(tmp).write_bytes(f.read())
                found += 1
    if found != 2:
        raise DataError(f"{deb}: not the r-cran-janeaustenr package (no data/Rdata.rdx and .rdb)")
    return out


def austen_from_debian(where: str | Path | None = None) -> Corpus:
    """Jane Austen's six novels in full from Debian's r-cran-janeaustenr (installed, a folder, or a .deb)."""
    from locaudit.evaluate.rdata import read_lazyload

    candidates = [Path(where)] if where else [Path(p) for p in (os.environ.get("LOCAUDIT_AUSTEN_DIR"), *DEBIAN_DIRS) if p]
    for c in candidates:
        if c.is_file() and c.suffix == ".deb":
            c = _extract_deb(c)
        if (c / "data" / "Rdata.rdx").is_file():
            objs = read_lazyload(c / "data" / "Rdata")
            docs = tuple((title, "\n\n".join(_paragraphs(objs[k]))) for k, title in AUSTEN_NOVELS.items() if k in objs)
            if len(docs) != len(AUSTEN_NOVELS):
                raise DataError(f"{c}: expected the novels {sorted(AUSTEN_NOVELS)}, found {sorted(objs)}")
            return Corpus("austen-debian", docs, str(c))
    raise DataError(f"corpus 'austen-debian': r-cran-janeaustenr not found in {[str(c) for c in candidates]}; "
                    "apt-get install r-cran-janeaustenr, or apt-get download it and use austen-debian:PATH.deb")


def load_corpus(spec: str) -> Corpus:
    """A corpus by name (`austen`, `austen-debian[:DIR_OR_DEB]`) or a UTF-8 text file by path."""
    if spec in PACKAGED:
        path = Path(__file__).parent / "corpora" / PACKAGED[spec]
        return Corpus(spec, tuple(_split_headed(path.read_text(encoding="utf-8"))), f"locaudit/evaluate/corpora/{PACKAGED[spec]}")
    if spec == "austen-debian" or spec.startswith("austen-debian:"):
        return austen_from_debian(spec.partition(":")[2] or None)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"KL/CE text {spec!r}: neither a corpus name ({', '.join([*PACKAGED, 'austen-debian'])}) "
                        "nor an existing text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"KL/CE text file {path}: not UTF-8 ({e})") from e
    if not text.strip():
        raise DataError(f"KL/CE text file {path} is empty")
    return Corpus(path.name, ((path.name, text),), str(path))


def corpus_windows(corpus: Corpus, tokenizer, max_length: int = 512, max_tokens: int | None = None) -> list[list[int]]:
    """Each document's tokens in consecutive windows of at most `max_length` tokens (BOS first where the
    tokenizer adds one); with `max_tokens`, documents contribute windows in turn until that many tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    lead = [bos] if bos is not None and probe and probe[0] == bos else []
    step = max_length - len(lead)
    if step < 2:
        raise DataError(f"max_length={max_length} is too short for KL/CE windows")
    per_doc = []
    for _, text in corpus.documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        per_doc.append([lead + ids[s: s + step] for s in range(0, len(ids), step) if len(ids[s: s + step]) > 1])
    out, total, k = [], 0, 0
    while any(k < len(w) for w in per_doc):  # round robin over documents, so a cap keeps every document
        for w in per_doc:
            if k < len(w):
                if max_tokens is not None and total + len(w[k]) > max_tokens and out:
                    return out
                out.append(w[k])
                total += len(w[k])
        k += 1
    if not out:
        raise DataError(f"corpus {corpus.name!r} has no text to score")
    return out
