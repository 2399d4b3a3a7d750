"""The pure batch planner of batch_manager: plans, analysis, formatting."""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass

import pytest

import batch_planner as bp
from utils import MetadataError, UsageError, format_size

KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12
MIB, GIB = 2**20, 2**30
DISK = 10 * TB
MARGIN = 0.95
CAPACITY = bp.batch_capacity(DISK, MARGIN)          # 9.5 TB


@dataclass(frozen=True)
class F:
    path: str
    size: int


def dataset_30tb() -> list[F]:
    """20,000 files, ~30 TB of regular files plus three 12 TB files, depth-first order."""
    rng = random.Random(20240601)
    files = [F(".gitattributes", 2 * KB), F("README.md", 18 * KB)]
    for lang in ("de", "en", "fr", "ja", "zh"):
        for split, count in (("test", 100), ("train", 3_200), ("validation", 100)):
            files += [F(f"data/{lang}/{split}/shard-{k:05d}.parquet",
                        rng.randint(GB // 2, 3 * GB)) for k in range(count)]
    for k in range(2_001):                        # small metadata, every tenth file empty
        size = 0 if k % 10 == 0 else rng.randint(1, 10 * MB)
        files.append(F(f"meta/items/item-{k:05d}.json", size))
    for part in range(3):                         # clips around one file bigger than a disk
        clips = [F(f"raw/part-{part}/clip-{k:03d}.mp4", rng.randint(MB, 100 * MB))
                 for k in range(331)]
        clips.insert(100, F(f"raw/part-{part}/full.tar", 12 * TB))
        files += clips
    files.append(F("zz-notes.txt", 0))
    assert len(files) == 20_000
    return files


def dataset_100k() -> list[F]:
    rng = random.Random(7)
    files = []
    for k in range(100_000):
        folder = f"data/c{k // 10_000}/s{k // 500}"
        files.append(F(f"{folder}/shard-{k:06d}.parquet", rng.randint(0, 2 * GB)))
    return files


def random_listing(rng: random.Random, capacity: int) -> list[F]:
    """A small depth-first listing with nested folders and sizes up to 1.5 x capacity."""
    files: list[F] = []

    def folder(prefix: str, depth: int) -> None:
        for k in range(rng.randint(0, 4)):
            files.append(F(f"{prefix}f{k}", rng.choice([0, rng.randint(0, capacity // 3),
                                                         rng.randint(0, capacity * 3 // 2)])))
        if depth < 3:
            for k in range(rng.randint(0, 3)):
                folder(f"{prefix}d{k}/", depth + 1)

    folder("", 0)
    return files


# ---------------------------------------------------------------- invariants

def check_plan(files: list[F], batches: list[bp.Batch], capacity: int, margin: float = 1.0,
               min_fill: float = bp.DEFAULT_MIN_FILL) -> None:
    """Everything a plan must satisfy, whatever the listing."""
    sizes = {f.path: f.size for f in files}
    assert Counter(p for b in batches for p in b.paths) == Counter(f.path for f in files)
    assert [b.number for b in batches] == list(range(1, len(batches) + 1))
    regular = [b for b in batches if not b.oversize]
    for b in batches:
        assert b.total_bytes == sum(sizes[p] for p in b.paths)
        if b.oversize:
            assert b.file_count == 1 and b.total_bytes > capacity
            assert b.needed_space == bp.needed_disk_space(b.total_bytes, margin)
            assert bp.batch_capacity(b.needed_space, margin) >= b.total_bytes
        else:
            assert b.total_bytes <= capacity and b.needed_space == 0
    # Order: regular batches, concatenated, are the listing without the oversize files.
    assert [p for b in regular for p in b.paths] == [f.path for f in files if f.size <= capacity]
    too_big = {f.path for f in files if f.size > capacity}
    assert {b.first_path for b in batches if b.oversize} == too_big
    # Fill: each regular batch but the last is min_fill full, or the next file did not fit.
    for cur, nxt in zip(regular, regular[1:], strict=False):
        assert (cur.total_bytes >= min_fill * capacity
                or cur.total_bytes + sizes[nxt.first_path] > capacity), (cur, nxt.first_path)
    check_oversize_placement(files, batches, capacity)


def check_oversize_placement(files: list[F], batches: list[bp.Batch], capacity: int) -> None:
    """An oversize batch comes right after the batch holding the regular file before it."""
    where = {p: b.number for b in batches for p in b.paths}
    last_regular = None
    expected: dict[str, int] = {}
    for f in files:
        if f.size <= capacity:
            last_regular = f.path
        else:
            expected[f.path] = where[last_regular] if last_regular else 0
    for b in batches:
        if b.oversize:
            anchor = expected[b.first_path]
            assert anchor < b.number
            between = batches[anchor:b.number - 1]   # batches after the anchor, before this one
            assert all(x.oversize for x in between), (b, anchor)


def regular_greedy_count(files: list[F], capacity: int) -> int:
    """Regular batches of plain greedy filling: the fewest any order-keeping plan can have."""
    count, room = 0, 0
    for f in files:
        if f.size > capacity:
            continue
        if count == 0 or f.size > room:
            count, room = count + 1, capacity
        room -= f.size
    return count


# ---------------------------------------------------------------- the 30 TB dataset

@pytest.fixture(scope="module")
def big() -> list[F]:
    return dataset_30tb()


def test_big_plan_keeps_every_invariant(big):
    batches = bp.plan_batches(big, CAPACITY, margin=MARGIN)
    check_plan(big, batches, CAPACITY, MARGIN)


def test_big_plan_fill_threshold_and_disk_count(big):
    # No regular file is bigger than 3 GB, far under half a disk: every regular batch but
    # the last is at least half full, and no disk is spent on keeping folders whole.
    batches = bp.plan_batches(big, CAPACITY, margin=MARGIN)
    regular = [b for b in batches if not b.oversize]
    assert all(b.total_bytes >= CAPACITY // 2 for b in regular[:-1])
    assert len(regular) == regular_greedy_count(big, CAPACITY)
    assert sum(b.oversize for b in batches) == 3


def test_big_plan_keeps_language_folders_whole_when_free(big):
    batches = bp.plan_batches(big, CAPACITY, margin=MARGIN)
    by_lang: dict[str, set[int]] = {}
    for b in batches:
        for p in b.paths:
            if p.startswith("data/"):
                by_lang.setdefault(p.split("/")[1], set()).add(b.number)
    whole = [lang for lang, numbers in by_lang.items() if len(numbers) == 1]
    assert len(whole) >= 2, by_lang
    # Train shards of a split language sit in consecutive batches, each a contiguous slice.
    for numbers in by_lang.values():
        assert sorted(numbers) == list(range(min(numbers), max(numbers) + 1))


def test_big_plan_oversize_files(big):
    batches = bp.plan_batches(big, CAPACITY, margin=MARGIN)
    oversize = [b for b in batches if b.oversize]
    assert [b.first_path for b in oversize] == [f"raw/part-{k}/full.tar" for k in range(3)]
    for b in oversize:
        assert b.needed_space == -(-12 * TB * 100 // 95)     # ceil(12 TB / 0.95), exactly
        assert b.needed_space > DISK


def test_plan_100k_files_is_fast():
    files = dataset_100k()
    start = time.perf_counter()
    batches = bp.plan_batches(files, 4 * TB)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"planning 100,000 files took {elapsed:.2f} s"
    check_plan(files, batches, 4 * TB)


def test_generator_input_is_accepted():
    files = [F(f"d/{k}", 10) for k in range(25)]
    batches = bp.plan_batches((f for f in files), 100)
    assert [b.file_count for b in batches] == [10, 10, 5]


# ---------------------------------------------------------------- the rule, by hand

def paths_of(batches: list[bp.Batch]) -> list[list[str]]:
    return [list(b.paths) for b in batches]


def test_folder_starts_new_batch_when_current_is_half_full():
    files = [F("a/1", 30), F("a/2", 30), F("b/1", 20), F("b/2", 30), F("c/1", 40)]
    assert paths_of(bp.plan_batches(files, 100)) == [["a/1", "a/2"], ["b/1", "b/2", "c/1"]]
    # min_fill=1 is plain greedy filling.
    assert paths_of(bp.plan_batches(files, 100, min_fill=1.0)) == [
        ["a/1", "a/2", "b/1"], ["b/2", "c/1"]]


def test_folder_is_split_when_current_batch_is_under_half_full():
    files = [F("r", 20), F("a/1", 45), F("a/2", 45)]
    assert paths_of(bp.plan_batches(files, 100)) == [["r", "a/1"], ["a/2"]]


def test_deepest_fitting_folder_is_kept_whole():
    # d/ (120) is too big for a batch; its subfolders d/x and d/y (60 each) are kept whole.
    files = [F("r", 30), F("d/x/1", 40), F("d/x/2", 20), F("d/y/1", 30), F("d/y/2", 30)]
    assert paths_of(bp.plan_batches(files, 100)) == [
        ["r", "d/x/1", "d/x/2"], ["d/y/1", "d/y/2"]]


def test_big_folder_is_spread_in_order_over_consecutive_batches():
    files = [F(f"train/shard-{k:02d}", 10) for k in range(25)]
    batches = bp.plan_batches(files, 100)
    assert paths_of(batches) == [[f.path for f in files[i:i + 10]] for i in (0, 10, 20)]


def test_keeping_a_folder_whole_never_costs_an_extra_disk():
    # Closing at 60 to keep b/ whole would take three batches where two do: b/ is split.
    files = [F("a/1", 60), F("b/1", 30), F("b/2", 30), F("c/1", 50)]
    assert paths_of(bp.plan_batches(files, 100)) == [["a/1", "b/1"], ["b/2", "c/1"]]
    # Allowed one more disk, or no limit, the folders stay whole.
    for extra in (1, None):
        assert paths_of(bp.plan_batches(files, 100, extra_batches=extra)) == [
            ["a/1"], ["b/1", "b/2"], ["c/1"]]
    # When it is free, b/ is kept whole even with no extra disk.
    files = [F("a/1", 60), F("b/1", 30), F("b/2", 30), F("c/1", 30)]
    assert paths_of(bp.plan_batches(files, 100)) == [["a/1"], ["b/1", "b/2", "c/1"]]


def test_oversize_file_is_pulled_out_and_its_folder_kept_together():
    files = [F("p", 10), F("v/a", 10), F("v/big", 150), F("v/b", 10), F("w", 95)]
    batches = bp.plan_batches(files, 100, margin=0.9)
    assert paths_of(batches) == [["p", "v/a", "v/b"], ["v/big"], ["w"]]
    assert batches[1].oversize and batches[1].needed_space == 167     # ceil(150 / 0.9)
    assert not batches[0].oversize and batches[0].needed_space == 0


def test_oversize_files_first_and_in_a_row():
    files = [F("big1", 500), F("big2", 300), F("x", 10), F("big3", 200)]
    batches = bp.plan_batches(files, 100)
    assert paths_of(batches) == [["big1"], ["big2"], ["x"], ["big3"]]
    assert [b.oversize for b in batches] == [True, True, False, True]


def test_zero_size_and_exact_fit_files():
    files = [F("e0", 0), F("full", 100), F("e1", 0), F("e2", 0)]
    batches = bp.plan_batches(files, 100)
    check_plan(files, batches, 100)
    assert [b.total_bytes for b in batches] == [100]


def test_folder_split_in_the_listing_is_still_planned_in_order():
    files = [F("a/1", 40), F("b/1", 40), F("a/2", 40), F("a/3", 10)]
    batches = bp.plan_batches(files, 100)
    check_plan(files, batches, 100)


def test_empty_listing():
    assert bp.plan_batches([], 100) == []
    assert "no files" in bp.format_plan([], 100)


@pytest.mark.parametrize("seed", range(300))
def test_random_listings_keep_every_invariant(seed):
    rng = random.Random(seed)
    capacity = rng.randint(50, 1_000)
    files = random_listing(rng, capacity)
    min_fill = rng.choice([0.0, 0.3, 0.5, 0.8, 1.0])
    extra = rng.choice([0, 0, 1, None])
    batches = bp.plan_batches(files, capacity, margin=0.9, min_fill=min_fill, extra_batches=extra)
    check_plan(files, batches, capacity, 0.9, min_fill)
    if extra == 0:
        assert sum(not b.oversize for b in batches) == regular_greedy_count(files, capacity)


# ---------------------------------------------------------------- capacity and errors

def test_batch_capacity():
    assert bp.batch_capacity(10 * TB, 0.95) == 9_500_000_000_000
    assert bp.batch_capacity(1000, 1) == 1000
    assert bp.batch_capacity(1001, 0.9) == 900
    assert bp.needed_disk_space(900, 0.9) == 1000
    assert bp.needed_disk_space(901, 0.9) == 1002


@pytest.mark.parametrize("available, margin", [
    (0, 0.9), (-5, 0.9), (100, 0), (100, -0.1), (100, 1.01), (100, float("nan")), (1, 0.5)])
def test_bad_capacity_arguments_raise_usage_error(available, margin):
    with pytest.raises(UsageError):
        bp.batch_capacity(available, margin)


@pytest.mark.parametrize("kwargs", [
    {"capacity": 0}, {"capacity": -1}, {"capacity": 10, "margin": 0},
    {"capacity": 10, "min_fill": 1.5}, {"capacity": 10, "extra_batches": -1}])
def test_bad_plan_arguments_raise_usage_error(kwargs):
    with pytest.raises(UsageError):
        bp.plan_batches([F("a", 1)], **kwargs)


def test_bad_available_space_in_analysis_raises_usage_error():
    with pytest.raises(UsageError):
        bp.analyze_files([F("a", 1)], available_space=0)


# ---------------------------------------------------------------- records and summaries

def test_batch_round_trips_through_json():
    batch = bp.Batch(3, ("a/1", "a/2"), 60)
    big = bp.Batch(4, ("v/big",), 150, oversize=True, needed_space=167)
    for b in (batch, big):
        assert bp.Batch.from_dict(json.loads(json.dumps(b.to_dict()))) == b
    assert (batch.file_count, batch.first_path, batch.last_path) == (2, "a/1", "a/2")


@pytest.mark.parametrize("record", [
    {}, {"number": 1, "paths": "abc", "total_bytes": 1},
    {"number": 0, "paths": ["a"], "total_bytes": 1},
    {"number": 1, "paths": [], "total_bytes": 0},
    {"number": 1, "paths": ["a", "b"], "total_bytes": 5, "oversize": True, "needed_space": 9}])
def test_malformed_batch_record_is_metadata_error(record):
    with pytest.raises(MetadataError):
        bp.Batch.from_dict(record)


def test_plan_summary_is_json_ready(big):
    batches = bp.plan_batches(big, CAPACITY, margin=MARGIN)
    summary = bp.plan_summary(batches, CAPACITY)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["file_count"] == 20_000
    assert summary["total_bytes"] == sum(f.size for f in big)
    assert summary["oversize_batch_count"] == 3
    assert summary["batch_count"] == len(batches) == len(summary["batches"])
    assert summary["capacity"] == CAPACITY


# ---------------------------------------------------------------- analysis

SMALL = [
    F("README.md", 5 * KB),
    F("data/a.parquet", 2 * GIB),
    F("data/b.parquet", 3 * GIB),
    F("data/sub/c.PARQUET", 512 * MIB),
    F("data/x.tar.gz", 150 * GIB),
    F("img/1.png", 100 * KB),
    F("img/2.png", 0),
    F("img/LICENSE", 20 * MIB),
    F(".gitattributes", 1 * KB),
]


def test_analyze_small_listing():
    a = bp.analyze_files(SMALL, available_space=100 * GIB, top_n=3)
    total = sum(f.size for f in SMALL)
    assert (a["file_count"], a["total_bytes"]) == (9, total)
    assert a["folders"] == [
        {"folder": "data", "files": 4, "bytes": 2 * GIB + 3 * GIB + 512 * MIB + 150 * GIB},
        {"folder": "img", "files": 3, "bytes": 100 * KB + 20 * MIB},
        {"folder": "(root)", "files": 2, "bytes": 6 * KB},
    ]
    assert a["extensions"] == [
        {"extension": ".gz", "files": 1, "bytes": 150 * GIB},
        {"extension": ".parquet", "files": 3, "bytes": 5 * GIB + 512 * MIB},
        {"extension": "(none)", "files": 2, "bytes": 20 * MIB + 1 * KB},
        {"extension": ".png", "files": 2, "bytes": 100 * KB},
        {"extension": ".md", "files": 1, "bytes": 5 * KB},
    ]
    assert [f["path"] for f in a["largest"]] == [
        "data/x.tar.gz", "data/b.parquet", "data/a.parquet"]
    hist = {h["label"]: (h["files"], h["bytes"]) for h in a["histogram"]}
    assert hist == {
        "< 1 MiB": (4, 5 * KB + 100 * KB + 1 * KB), "1 MiB - 10 MiB": (0, 0),
        "10 MiB - 100 MiB": (1, 20 * MIB), "100 MiB - 1 GiB": (1, 512 * MIB),
        "1 GiB - 10 GiB": (2, 5 * GIB), "10 GiB - 100 GiB": (0, 0), ">= 100 GiB": (1, 150 * GIB)}
    assert a["histogram"][1]["min_bytes"] == MIB and a["histogram"][-1]["max_bytes"] is None
    disks = a["disks"]
    assert disks["disks_min"] == 2                      # 155.5 GiB over 100 GiB disks
    assert disks["disks_min_fitting"] == 1              # 5.5 GiB once the big file is out
    assert disks["disks_planned"] == 1                  # the 150 GiB file needs its own disk
    assert disks["oversize_files"] == [{"path": "data/x.tar.gz", "size": 150 * GIB}]
    assert (disks["oversize_count"], disks["oversize_bytes"]) == (1, 150 * GIB)
    assert json.loads(json.dumps(a)) == a


def test_histogram_boundaries_are_binary():
    a = bp.analyze_files([F("a", MIB - 1), F("b", MIB), F("c", 10 * MIB), F("d", GIB - 1),
                          F("e", GIB), F("f", 100 * GIB)])
    assert [h["files"] for h in a["histogram"]] == [1, 1, 1, 1, 1, 0, 1]


def test_analyze_without_space_has_no_disks():
    a = bp.analyze_files([])
    assert a["file_count"] == 0 and "disks" not in a and a["largest"] == []
    assert "0 files" in bp.format_analysis(a)


# ---------------------------------------------------------------- formatting

def test_format_analysis_reads_well(big):
    text = bp.format_analysis(bp.analyze_files(big, available_space=DISK))
    for heading in ("Top-level folders", "Extensions", "Largest files", "Size histogram",
                    "Disks of", ".parquet", "(root)", "raw/part-0/full.tar", ">= 100 GiB"):
        assert heading in text
    assert "files bigger than one disk: 3 (32.74 TiB)" in text


def test_format_plan_table_is_aligned_and_marks_oversize(big):
    batches = bp.plan_batches(big, CAPACITY, margin=MARGIN)
    text = bp.format_plan(batches, CAPACITY)
    lines = text.splitlines()
    header, rule = lines[0], lines[1]
    rows = lines[2:2 + len(batches)]
    assert header.startswith("batch") and set(rule.replace(" ", "")) == {"-"}
    # Right-aligned number columns end at the same place on every row.
    size_end = header.index("size") + len("size")
    assert all(row[size_end - 1] != " " for row in rows)
    marker = f"OVERSIZE: needs a {format_size(bp.needed_disk_space(12 * TB, MARGIN))} disk"
    assert sum(row.endswith(marker) for row in rows) == 3
    assert "20,000 files" in lines[-2] and "capacity" in lines[-2]


def test_format_plan_shortens_long_paths():
    long = "data/" + "very-long-folder-name/" * 5 + "shard-00001.parquet"
    text = bp.format_plan(bp.plan_batches([F(long, 1)], 10), 10)
    assert long not in text and "..." in text and "shard-00001.parquet" in text


# ---------------------------------------------------------------- --workers

def _best_split(sizes: list[int], count: int) -> int:
    """The smallest largest batch of any order-keeping split into `count` runs (brute force)."""
    import itertools
    n = len(sizes)
    return min(max(sum(sizes[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
               for cuts in itertools.combinations(range(1, n), count - 1))


def test_workers_split_in_order_every_file_once_the_largest_batch_smallest() -> None:
    rng = random.Random(15)
    for _ in range(400):
        n, workers = rng.randint(1, 11), rng.randint(1, 6)
        files = [F(f"f{i:02d}", rng.choice([0, 1, 7, 100, rng.randint(0, 1000)])) for i in range(n)]
        batches = bp.plan_workers(files, workers)
        assert [p for b in batches for p in b.paths] == [f.path for f in files]
        assert len(batches) == min(workers, n) and all(b.paths for b in batches)
        assert [b.number for b in batches] == list(range(1, len(batches) + 1))
        largest = max(b.total_bytes for b in batches)
        assert largest == _best_split([f.size for f in files], len(batches))
        assert largest <= -(-sum(f.size for f in files) // len(batches)) + max(f.size for f in files)


def test_workers_batches_are_about_equal() -> None:
    files = [F(f"d{i % 3}/s{i:03d}", 1000 + 7 * i) for i in range(120)]
    sizes = [b.total_bytes for b in bp.plan_workers(files, 4)]
    assert len(sizes) == 4 and max(sizes) - min(sizes) <= 1000 + 7 * 119


def test_workers_within_a_disk_run_in_rounds_of_n_and_refuse_a_file_no_disk_holds() -> None:
    files = [F(f"s{i:02d}", 100) for i in range(40)]          # 4,000 bytes
    batches = bp.plan_workers(files, 3, capacity=700)          # needs 6 disks: 2 rounds of 3
    assert len(batches) == 6 and all(b.total_bytes <= 700 for b in batches)
    assert [p for b in batches for p in b.paths] == [f.path for f in files]
    assert len(bp.plan_workers(files, 4, capacity=10_000)) == 4
    with pytest.raises(UsageError, match="bigger than one disk"):
        bp.plan_workers([*files, F("huge", 800)], 3, capacity=700)
    with pytest.raises(UsageError, match="workers"):
        bp.plan_workers(files, 0)
    assert bp.plan_workers([], 3) == []


def test_workers_plan_of_a_30tb_listing_is_quick() -> None:
    files = dataset_30tb()
    started = time.monotonic()
    batches = bp.plan_workers(files, 64)
    assert time.monotonic() - started < 5
    assert len(batches) == 64 and sum(b.file_count for b in batches) == len(files)
