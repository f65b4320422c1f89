"""Writers of tiny datasets in the exact on-disk formats the readers of autopeft.data expect."""

from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (20, 16), mode: str = "RGB") -> Path:
    """A small random JPEG (size is width × height)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, "JPEG")
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its bytes, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def write_flowers(root: Path, trn: list[int], val: list[int], tst: list[int], labels: list[int]) -> Path:
    """torchvision's Flowers102 layout: ROOT/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}.

    Image ids are 1-based; `labels[i]` (1-102) is the label of image i + 1.
    """
    folder = root / "flowers-102"
    for image_id in range(1, len(labels) + 1):
        write_jpeg(folder / "jpg" / f"image_{image_id:05d}.jpg", image_id)
    # The originals are 1×N double arrays; keep that shape so squeeze_me matters as it does for real files.
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": np.array([labels], dtype=np.float64)})
    ids = {"trnid": trn, "valid": val, "tstid": tst}
    scipy.io.savemat(folder / "setid.mat", {k: np.array([v], dtype=np.float64) for k, v in ids.items()})
    return folder


def write_vtab(root: Path, task: str, sizes: dict[str, int], num_classes: int) -> Path:
    """NOAH's vtab-1k layout with `sizes` images per list; train800val200 lists train800 then val200.

    Returns the task folder.
    """
    folder = root / "vtab-1k" / task
    lines: dict[str, list[str]] = {}
    for split, count in sizes.items():
        sub = "train" if split in ("train800", "val200") else split
        lines[split] = []
        for i in range(count):
            rel = f"images/{sub}/{split}{i:06d}.jpg"
            write_jpeg(folder / rel, 1000 * len(split) + i)
            lines[split].append(f"{rel} {i % num_classes}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, entries in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return folder


def write_image_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """ROOT/<class>/<n>.jpg with per_class[class] images each."""
    for c, count in per_class.items():
        for i in range(count):
            write_jpeg(root / c / f"{i:03d}.jpg", seed + 100 * i + len(c))
    return root


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An IDX file of unsigned bytes (the MNIST format), gzipped when the name ends with .gz."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def write_fashion(folder: Path, n_train: int = 1100, n_test: int = 30, gz: bool = True) -> Path:
    """The four Fashion-MNIST files in `folder`; image i is filled with the value i % 256 (label i % 10)."""
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        values = (np.arange(n) % 256).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", np.broadcast_to(values[:, None, None], (n, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))
    return folder


# --- Fashion-MNIST as shipped with the tests (tests/fixtures/fashion-mnist/README.md) -------------------------------

# A data root in torchvision's layout holding Fashion-MNIST's real test pair (FashionMNIST/raw/t10k-*.gz), and a
# record of the 60,000 train images: their 64-bit hashes (`image_hash64`), sorted, made by `write_train_hashes`.
FASHION_ROOT = Path(__file__).parent / "fixtures" / "fashion-mnist"
FASHION_RAW = FASHION_ROOT / "FashionMNIST" / "raw"
FASHION_TRAIN_HASHES = FASHION_ROOT / "train-images-hash64.npy"


def image_hash64(images: np.ndarray) -> np.ndarray:
    """One uint64 per image: the 8-byte BLAKE2b digest of its uint8 pixels (row-major), read big-endian."""
    rows = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)
    digests = [hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in rows]
    return np.array([int.from_bytes(d, "big") for d in digests], dtype=np.uint64)


def write_train_hashes(train_images: Path, out: Path = FASHION_TRAIN_HASHES) -> np.ndarray:
    """Record the hashes of Fashion-MNIST's train images (`train_images`: train-images-idx3-ubyte(.gz)) in `out`.

    Made by: PYTHONPATH=tests python -c "from data_fixtures import write_train_hashes as w;
    from pathlib import Path; w(Path('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'))"
    """
    from autopeft.data.arrays import read_idx

    record = np.sort(image_hash64(read_idx(train_images)))
    np.save(out, record)
    return record


def write_cifar(root: Path, classes: int, per_batch: int = 220, n_test: int = 40) -> Path:
    """torchvision's CIFAR-10 (classes=10) or CIFAR-100 (classes=100) python layout with random pixels."""
    rng = np.random.default_rng(classes)
    if classes == 10:
        folder, key, names_key = root / "cifar-10-batches-py", "labels", "label_names"
        train_files, test_file, meta = [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta"
    else:
        folder, key, names_key = root / "cifar-100-python", "fine_labels", "fine_label_names"
        train_files, test_file, meta = ["train"], "test", "meta"
        per_batch *= 5
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f, per_batch) for f in train_files] + [(test_file, n_test)]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(np.arange(n) % classes)}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / meta).write_bytes(pickle.dumps({names_key: [f"class{i}" for i in range(classes)]}))
    return folder


def guard_offline(monkeypatch, tmp_path: Path) -> None:
    """Keep a test off the network, the user's data root and the system's Debian Fashion-MNIST."""
    from autopeft.data import arrays, base

    monkeypatch.setenv("AUTOPEFT_DATA", str(tmp_path / "default-root"))
    monkeypatch.setenv("AUTOPEFT_OFFLINE", "1")
    monkeypatch.setattr(arrays, "DEBIAN_FASHION", tmp_path / "no-debian")

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(base, "network_answers", refuse)


def labels_of(dataset) -> list[int]:
    return list(dataset.targets)


def check_items(splits, size: tuple[int, int, int]) -> None:
    """Every split yields (float tensor of `size`, int label in range)."""
    import torch

    for split in ("train", "val", "test", "train_full"):
        x, y = splits.split(split)[0]
        assert x.shape == size and x.dtype == torch.float32 and isinstance(y, int)
        assert 0 <= y < splits.num_classes


# --- FGVC layouts (CUB-200-2011, NABirds, Stanford Dogs, Stanford Cars) -------------------------------------------


def write_png(path: Path, seed: int, size: int = 8) -> Path:
    """A tiny random RGB PNG."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(path, "PNG")
    return path


def write_cub_layout(folder: Path, class_ids: list[int], names: dict[int, str], train: int, test: int,
                     image_id=str) -> list[str]:
    """The CUB / NABirds file set in `folder`: `train` + `test` images per class id, images/<class>/<n>.png.

    `names` is the whole of classes.txt (NABirds' also names classes no image uses); `image_id(n)` makes the id of
    image n (CUB: numbers, NABirds: UUIDs). Returns the image paths relative to images/, in images.txt order.
    """
    rows, rels = [], []
    n = 0
    for cid in class_ids:
        for k in range(train + test):
            n += 1
            rel = f"{cid:04d}/{n:05d}.png"
            write_png(folder / "images" / rel, n)
            rows.append((image_id(n), rel, cid, 1 if k < train else 0))
            rels.append(rel)
    (folder / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (folder / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (folder / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (folder / "classes.txt").write_text("".join(f"{c} {name}\n" for c, name in names.items()))
    return rels


def write_cub(root: Path, classes: int = 3, train: int = 10, test: int = 2) -> Path:
    """ROOT/CUB_200_2011 with class ids 1..classes named like CUB's ("001.Black_footed_Albatross")."""
    folder = root / "CUB_200_2011"
    names = {c: f"{c:03d}.Bird_{c}" for c in range(1, classes + 1)}
    write_cub_layout(folder, list(names), names, train, test)
    return folder


def write_nabirds(root: Path, used: tuple[int, ...] = (295, 313, 1010), train: int = 10, test: int = 3) -> Path:
    """ROOT/nabirds with sparse class ids (`used` by images, plus hierarchy nodes 0 and 1 that none uses), UUID
    image ids and hierarchy.txt."""
    folder = root / "nabirds"
    names = {0: "Birds", 1: "Perching Birds", **{c: f"Species {c} (Adult)" for c in used}}
    write_cub_layout(folder, list(used), names, train, test, image_id=lambda n: f"{n:08x}-21dc-4d0c-bfe1-4cae3c85c8")
    (folder / "hierarchy.txt").write_text("1 0\n" + "".join(f"{c} 1\n" for c in used))
    return folder


def write_dogs(root: Path, breeds: tuple[str, ...] = ("n02085620-Chihuahua", "n02085782-Japanese_spaniel",
                                                      "n02113799-standard_poodle"), train: int = 10, test: int = 2,
               lists: str = "lists") -> Path:
    """ROOT/stanford_dogs: Images/<breed>/<n>.png and <lists>/{train,test}_list.mat (file_list, labels 1-based)."""
    folder = root / "stanford_dogs"
    entries: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    n = 0
    for label, breed in enumerate(breeds, 1):
        for k in range(train + test):
            n += 1
            rel = f"{breed}/{breed.split('-')[0]}_{n}.png"
            write_png(folder / "Images" / rel, n)
            entries["train" if k < train else "test"].append((rel, label))
    (folder / lists).mkdir(parents=True, exist_ok=True)
    for split, rows in entries.items():
        # as the originals: file_list a cell column of strings, labels an N×1 double column
        files = np.empty((len(rows), 1), dtype=object)
        files[:, 0] = [np.array([rel]) for rel, _ in rows]
        labels = np.array([[float(y)] for _, y in rows])
        scipy.io.savemat(folder / lists / f"{split}_list.mat", {"file_list": files, "labels": labels})
    return folder


def _cars_annos(rows: list[tuple[str, int]]) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    annos = np.empty((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, (fname, label) in enumerate(rows):
        annos[0, i] = (np.array([[1.0]]), np.array([[1.0]]), np.array([[7.0]]), np.array([[7.0]]),
                       np.array([[float(label)]]), np.array([fname]))
    return annos


def write_cars(root: Path, classes: int = 3, train: int = 10, test: int = 2) -> Path:
    """ROOT/stanford_cars in torchvision's layout: devkit/{cars_meta,cars_train_annos}.mat,
    cars_test_annos_withlabels.mat, cars_train/NNNNN.png, cars_test/NNNNN.png (classes 1-based)."""
    folder = root / "stanford_cars"
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for split, per_class in (("train", train), ("test", test)):
        for k in range(classes * per_class):
            fname = f"{k + 1:05d}.png"
            write_png(folder / f"cars_{split}" / fname, 7 * k + len(split))
            rows[split].append((fname, 1 + k % classes))
    (folder / "devkit").mkdir(parents=True, exist_ok=True)
    names = np.empty((1, classes), dtype=object)
    names[0, :] = [f"Make {c} Model {c} 2012" for c in range(1, classes + 1)]
    scipy.io.savemat(folder / "devkit" / "cars_meta.mat", {"class_names": names})
    scipy.io.savemat(folder / "devkit" / "cars_train_annos.mat", {"annotations": _cars_annos(rows["train"])})
    scipy.io.savemat(folder / "cars_test_annos_withlabels.mat", {"annotations": _cars_annos(rows["test"])})
    return folder


def write_vpt_json(folder: Path, splits: dict[str, dict[str, int]]) -> None:
    """VPT's split files in `folder`: {train,val,test}.json mapping image path -> label."""
    import json

    for split, table in splits.items():
        (folder / f"{split}.json").write_text(json.dumps(table))
