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
from pathlib import Path

from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader import Reader

LABEL = "cls"  # webdataset's field of a sample's class index


def _key_and_field(name: str) -> tuple[str, str]:
    """Webdataset's split of a member name: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field.lower()


def holds_labelled_samples(tar: Path, peek: int = 32) -> bool:
    """Whether ``tar`` is a webdataset shard: a ``KEY.cls`` among its first members."""
    with tarfile.open(tar) as tf:
        for i, member in enumerate(tf):
            if member.isfile() and _key_and_field(member.name)[1] == LABEL:
                return True
            if i + 1 >= peek:
                return False
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
            with tarfile.open(path) as tf:
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
        except (tarfile.TarError, EOFError) as e:  # a corrupt shard
            raise ValueError(f"{path}: not a readable tar file ({e}); replace or remove this shard") from None
        end = os.path.getsize(path)
        if any(offset + size > end for _, offset, size, _ in found.values()):
            raise ValueError(f"{path}: not a readable tar file (cut short: its images run past its {end} bytes); "
                             f"replace or remove this shard")
        missing = [k for k in found if k not in labels]
        if missing:
            raise ValueError(f"{path}: {len(missing)} image(s) without a {LABEL} label beside them (first: "
                             f"{missing[0]}; a webdataset shard keeps KEY.{LABEL} next to KEY.jpg)")
        samples.extend(found.values())
        targets.extend(labels[k] for k in found)
    return tuple(samples), tuple(targets)


class WebDatasetShards(Reader):
    """timm reader of webdataset shards (see the module): ``reader[i]`` is (image bytes, class)."""

    def __init__(self, shards: list[Path]):
        super().__init__()
        self.shards = tuple(str(p) for p in sorted(shards))
        self.samples, self.targets = _index(self.shards, tuple(os.stat(p).st_mtime_ns for p in self.shards))
        negative = [t for t in self.targets if t < 0]
        if negative:
            raise ValueError(f"{len(negative)} sample(s) in {Path(self.shards[0]).parent} have a negative class "
                             f"index (first: {negative[0]})")
        self.num_classes = max(self.targets) + 1 if self.targets else 0
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}  # open files stay with the process that opened them

    def __getitem__(self, index: int):
        shard, offset, size, _ = self.samples[index]
        if self._pid != os.getpid():  # a forked worker: its own handles, not its parent's file positions
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.shards[shard], "rb")
        f.seek(offset)
        return io.BytesIO(f.read(size)), self.targets[index]

    def __len__(self) -> int:
        return len(self.samples)

    def _filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        shard, _, _, key = self.samples[index]
        if basename:
            return key
        return f"{os.path.abspath(self.shards[shard]) if absolute else self.shards[shard]}/{key}"
