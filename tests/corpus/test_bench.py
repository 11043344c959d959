"""The packed loader delivers at least 1M tokens/s from prepared shards on 2 CPU cores."""
import json

from corpus.bench import main, run, synthetic_shards
from corpus.shards import PreparedDataset


def test_loader_throughput_at_least_1m_tokens_per_s(tmp_path):
    prepared = PreparedDataset.open(synthetic_shards(tmp_path, tokens=4 << 20, sources=2, shard_tokens=1 << 20))
    result = run(prepared, seq_len=2048, batch_size=8, seconds=1.0)
    assert result["tokens_per_s"] >= 1_000_000, result


def test_cli_prints_one_json_line(capsys):
    main(["--tokens", str(1 << 20), "--seq_len", "256", "--batch_size", "4", "--seconds", "0.2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["tokens_per_s"] > 0
