"""Webdataset-format tar shards read with random access: each sample an image ``KEY.jpg`` (or
``.jpeg``, ``.png``) beside its class index ``KEY.cls``, as ``webdataset`` writes them and as timm's
``imagenet-1k-wds`` ships.

timm reads such shards as a stream; read in place by offset, they stay a map-style dataset, so the
trainer's sampler keeps what it gives every other dataset: exact resume after a kill, with any
``--workers``, and several training sizes. The shards are indexed once per process (a scan of their
headers; the ``.cls`` members are read, the images are not).
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
from collections import OrderedDict
from pathlib import Path

from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader import Reader

LABEL = "cls"  # webdataset's field of a sample's class index


def _key_and_field(name: str) -> tuple[str, str]:
    """Webdataset's split of a member name: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field.lower()


def _unreadable(path, why: str) -> ValueError:
    """The one message for a shard that cannot be read by offset, saying what to do about it."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
    except OSError:
        gzipped = False
    if gzipped:  # images are read in place by offset, which a compressed stream has not
        why = "gzip-compressed; shards are read by offset, so gunzip it to a plain tar"
    return ValueError(f"{path}: not a readable tar file ({why}); replace or remove this shard")


def holds_labelled_samples(tar: Path, peek: int = 32) -> bool:
    """Whether ``tar`` is a webdataset shard: a ``KEY.cls`` among its first members. Opened as a plain
    tar (``r:``), as the shards are read by offset."""
    try:
        with tarfile.open(tar, "r:") as tf:
            for i, member in enumerate(tf):
                if member.isfile() and _key_and_field(member.name)[1] == LABEL:
                    return True
                if i + 1 >= peek:
                    return False
    except (tarfile.TarError, EOFError) as e:
        raise _unreadable(tar, str(e)) from None
    return False


@functools.lru_cache(maxsize=8)
def _index(shards: tuple[str, ...], stamps: tuple[int, ...]) -> tuple[tuple, tuple]:
    """Every sample's (shard, offset, size, key) in shard and tar order, and its class. ``stamps``
    (the shards' modification times) make a rewritten shard indexed again."""
    del stamps
    images = get_img_extensions(as_set=True)  # with their dots: .jpg, .jpeg, .png
    samples, targets = [], []
    for s, path in enumerate(shards):
        found, labels = {}, {}
        try:
            with tarfile.open(path, "r:") as tf:  # plain tar: the offsets are read in place, uncompressed
                for member in tf:
                    if not member.isfile():
                        continue
                    key, field = _key_and_field(member.name)
                    if f".{field}" in images:
                        found[key] = (s, member.offset_data, member.size, key)
                    elif field == LABEL:
                        text = tf.extractfile(member).read().decode(errors="replace").strip()
                        try:
                            labels[key] = int(text)
                        except ValueError:
                            raise ValueError(f"{path}: {member.name} holds {text[:20]!r}, not a class "
                                             f"index") from None
                # tarfile ends its scan without an error at a file cut at or inside a member's header;
                # only the end-of-archive marker (a zero block) shows the scan reached the real end.
                scanned = tf.offset
                tf.fileobj.seek(scanned)
                marker = tf.fileobj.read(tarfile.BLOCKSIZE)
        except (tarfile.TarError, EOFError) as e:  # a corrupt shard
            raise _unreadable(path, str(e)) from None
        end = os.path.getsize(path)
        if any(offset + size > end for _, offset, size, _ in found.values()):
            raise _unreadable(path, f"cut short: its images run past its {end} bytes")
        if marker != bytes(tarfile.BLOCKSIZE):
            raise _unreadable(path, f"cut short or damaged: no end-of-archive marker after its last whole member, "
                                    f"at byte {scanned} of {end}")
        missing = [k for k in found if k not in labels]
        if missing:
            raise ValueError(f"{path}: {len(missing)} image(s) without a {LABEL} label beside them (first: "
                             f"{missing[0]}; a webdataset shard keeps KEY.{LABEL} next to KEY.jpg)")
        samples.extend(found.values())
        targets.extend(labels[k] for k in found)
    return tuple(samples), tuple(targets)


class WebDatasetShards(Reader):
    """timm reader of webdataset shards (see the module): ``reader[i]`` is (image bytes, class).

    Each process keeps at most ``MAX_OPEN_SHARDS`` shards open, closing the least recently used: with
    random access it would otherwise soon hold every shard open, and a process's open files are limited
    (1024 by default; imagenet-1k-wds has 1024 shards, and every loader worker and rank opens its own)."""

    MAX_OPEN_SHARDS = 64

    def __init__(self, shards: list[Path]):
        super().__init__()
        self.shards = tuple(str(p) for p in sorted(shards))
        self.samples, self.targets = _index(self.shards, tuple(os.stat(p).st_mtime_ns for p in self.shards))
        negative = [t for t in self.targets if t < 0]
        if negative:
            raise ValueError(f"{len(negative)} sample(s) in {Path(self.shards[0]).parent} have a negative class "
                             f"index (first: {negative[0]})")
        self.num_classes = max(self.targets) + 1 if self.targets else 0
        self._files: OrderedDict[int, io.BufferedReader] = OrderedDict()  # least recently used first
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": OrderedDict()}  # open files stay with the process that opened them

    def _open(self, shard: int) -> io.BufferedReader:
        """This process's open file of ``shard``, at most ``MAX_OPEN_SHARDS`` of them kept open."""
        if self._pid != os.getpid():  # a forked worker: its own handles, not its parent's file positions
            for f in self._files.values():
                f.close()  # this process's copies of the parent's descriptors; the parent's stay open
            self._files, self._pid = OrderedDict(), os.getpid()
        f = self._files.get(shard)
        if f is not None:
            self._files.move_to_end(shard)
            return f
        while self._files and len(self._files) >= max(1, self.MAX_OPEN_SHARDS):
            self._files.popitem(last=False)[1].close()
        f = self._files[shard] = open(self.shards[shard], "rb")
        return f

    def __getitem__(self, index: int):
        shard, offset, size, _ = self.samples[index]
        f = self._open(shard)
        f.seek(offset)
        return io.BytesIO(f.read(size)), self.targets[index]

    def __len__(self) -> int:
        return len(self.samples)

    def _filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        shard, _, _, key = self.samples[index]
        if basename:
            return key
        return f"{os.path.abspath(self.shards[shard]) if absolute else self.shards[shard]}/{key}"
