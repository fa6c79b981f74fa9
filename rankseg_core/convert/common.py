"""What every converter shares: options, the partition into parts, and the final assembly."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rankseg_core.errors import UserError
from rankseg_core.shards.write import (
    DatasetHeader,
    EncodedSample,
    assemble,
    claim_output,
    pending_shards,
    release_output,
    shard_count,
    write_pending,
)
from rankseg_core.utils.environment import write_record
from rankseg_core.utils.parallel import ordered_map
from rankseg_core.utils.progress import console


@dataclass
class ConvertOptions:
    """The options common to every `rankseg prepare <dataset>` command."""

    workers: int = 0  # processes (spawn); 0 = convert in this process
    num_shards: int = 1  # number of parts (machines / SLURM array tasks)
    shard_index: int | None = None  # this machine's part; None = all remaining parts + assemble
    limit: int | None = None  # first N samples of each split (sorted keys), for quick looks
    on_error: str = "fail"  # fail | skip (skipped samples go to skipped.jsonl)
    samples_per_shard: int = 1000

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise UserError("--samples-per-shard must be >= 1")
        if self.workers < 0:
            raise UserError("--workers must be >= 0")
        if self.num_shards < 1:
            raise UserError("--num-shards must be >= 1")
        if self.shard_index is not None and not 0 <= self.shard_index < self.num_shards:
            raise UserError(f"--shard-index must be in 0..{self.num_shards - 1}")
        if self.on_error not in ("fail", "skip"):
            raise UserError(f"--on-error must be 'fail' or 'skip', not {self.on_error!r}")
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be >= 1")


def claim(out: str | Path, header: DatasetHeader, opts: ConvertOptions) -> Path:
    """Validate `opts`, record them in `header.options` and claim `out` (idempotent).

    Claiming takes the directory's writer lock for this process (released when
    `run_conversion` ends, or when the process does), so two conversions into one `--out`
    cannot interleave. Converters that write caches into `out` before converting (ADE20K-X's
    class frequencies) call this first; `run_conversion` calls it again and finds the same
    marker and lock.
    """
    opts.validate()
    out = Path(out)
    header.options = dict(header.options, limit=opts.limit, samples_per_shard=opts.samples_per_shard)
    part = None if opts.shard_index is None else (opts.shard_index, opts.num_shards)
    claim_output(out, header, part)
    return out


def run_conversion(out: str | Path, header: DatasetHeader, splits: Mapping[str, Sequence[str]],
                   maker: Callable[[str], EncodedSample], opts: ConvertOptions) -> dict | None:
    """Convert every split's keys with `maker`; assemble `dataset.json` unless this is one part.

    `header.options` must hold everything that changes the output (so a re-run with other
    options is refused instead of mixing shards); `limit` is added here.
    Returns the assembled index, or None when only one part (`shard_index`) was converted.
    """
    out = claim(out, header, opts)
    try:
        # env.json; a re-run (resume) or another --shard-index part adds env-<n>.json
        write_record(out, what="prepare")
        todo, counts = {}, {}
        for split, keys in splits.items():
            keys = sorted(keys)[:opts.limit] if opts.limit else list(keys)
            if not keys:
                raise UserError(f"no samples found for split '{split}': check the dataset root")
            todo[split] = pending_shards(out, split, keys, samples_per_shard=opts.samples_per_shard,
                                         num_parts=opts.num_shards, part=opts.shard_index)
            counts[split] = shard_count(len(keys), opts.samples_per_shard)
        if opts.shard_index is not None and opts.shard_index >= max(counts.values()):
            _note_idle_part(opts, counts)
            return None
        # One ordered stream over every pending shard of every split: the workers go on
        # converting while this process writes a finished shard or moves to the next split.
        stream = [key for shards in todo.values() for shard in shards for key in shard.keys]
        with ordered_map(maker, stream, opts.workers if stream else 0) as results:
            for split, shards in todo.items():
                if shards:
                    write_pending(shards, results, header, on_error=opts.on_error, desc=f"{header.name} {split}")
        if opts.shard_index is not None:
            return None
        return assemble(out, header, list(splits))
    finally:
        release_output(out)


def _note_idle_part(opts: ConvertOptions, counts: Mapping[str, int]) -> None:
    """A `--shard-index` part the plan gives no shard: not an error (a SLURM array task with
    nothing to do must not fail the array), but said clearly."""
    sizes = ", ".join(f"{n} in {split}" for split, n in counts.items())
    console.print(f"note: --shard-index {opts.shard_index} has nothing to write: the plan has "
                  f"{sizes} shard(s) (--samples-per-shard {opts.samples_per_shard}), so only parts "
                  f"0..{max(counts.values()) - 1} of --num-shards {opts.num_shards} get work",
                  highlight=False, soft_wrap=True)
