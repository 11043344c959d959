"""The loader benchmark: it reads what the loader really serves and reports it as one JSON line.

The throughput goal (at least 1M tokens/s from prepared shards on 2 CPU cores) is checked by running
`python -m corpus.bench`, not by a timed test: timings on a shared CI machine are not a correctness signal.
"""
import json

from corpus.bench import main, run, synthetic_shards
from corpus.shards import PreparedDataset


def test_benchmark_counts_the_tokens_it_served(tmp_path):
    prepared = PreparedDataset.open(synthetic_shards(tmp_path, tokens=1 << 20, sources=2, shard_tokens=1 << 18))
    result = run(prepared, seq_len=256, batch_size=4, seconds=0.2)
    assert result["batches"] > 0
    served = result["batches"] * 4 * 256
    assert abs(result["tokens_per_s"] * result["seconds"] / served - 1) < 0.01  # rate x time = tokens served


def test_cli_prints_one_json_line(capsys):
    main(["--tokens", str(1 << 20), "--seq_len", "256", "--batch_size", "4", "--seconds", "0.2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["tokens_per_s"] > 0
