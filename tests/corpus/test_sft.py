"""Finetuning data: instruction and chat jsonl, loss on responses only, packing, truncation, resume."""
import json

import pytest
import torch
from corpus_fakes import write_jsonl

from corpus.errors import DataError
from corpus.sft import SFTLoader

SEQ = 256


def instruction_records(n=30):
    return [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"numbers {i}",
             "output": f"The sum is {2 * i + 1}."} for i in range(n)]


def chat_records(n=20):
    return [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"Hi {i}"},
                          {"role": "assistant", "content": f"Hello {i}!"},
                          {"role": "user", "content": "Again?"},
                          {"role": "assistant", "content": f"Yes {i}."}]} for i in range(n)]


@pytest.fixture
def files(tmp_path):
    return (write_jsonl(tmp_path / "inst.jsonl", instruction_records()),
            write_jsonl(tmp_path / "chat.jsonl.zst", chat_records(), compress=True))


def make(paths, tok, **kw):
    args = dict(seq_len=SEQ, batch_size=4, rank=0, world_size=1, seed=7)
    args.update(kw)
    return SFTLoader(paths, tok, **args)


def label_texts(batch, tok):
    """Each run of labels (not -100) decoded: what the model is trained to say."""
    out = []
    for row in batch["labels"]:
        run = []
        for t in row.tolist() + [-100]:
            if t == -100:
                if run:
                    out.append(tok.decode(run) + ("<eos>" if run[-1] == tok.eos_id else ""))
                run = []
            else:
                run.append(t)
    return out


def test_instruction_loss_only_on_the_response(tmp_path, tok):
    path = write_jsonl(tmp_path / "inst.jsonl", instruction_records(8))
    loader = make(path, tok, pack=False, batch_size=8)
    batch = next(loader)
    answers = sorted(label_texts(batch, tok))
    assert answers == sorted(f"The sum is {2 * i + 1}.<eos>" for i in range(8))
    text = tok.decode(batch["input_ids"][0].tolist())
    assert text.startswith("### Instruction:\nAdd ") and "### Response:\n" in text
    assert batch["input_ids"][0, 0] == tok.bos_id


def test_chat_loss_only_on_assistant_turns(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(6))
    batch = next(make(path, tok, pack=False, batch_size=6))
    said = label_texts(batch, tok)
    assert sorted(said) == sorted([f"Hello {i}!<eos>" for i in range(6)] + [f"Yes {i}.<eos>" for i in range(6)])
    assert not any("Hi" in s or "brief" in s or "###" in s for s in said)


def test_packed_rows_keep_examples_apart(files, tok):
    loader = make(list(files), tok)
    assert loader.stats["examples"] == 50 and loader.stats["rows"] < 50 and loader.stats["fill"] > 0.5
    assert loader.samples_per_epoch == loader.stats["rows"]
    for batch in [next(loader) for _ in range(8)]:
        ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
        starts = pos == 0
        assert torch.all(labels[:, :-1][starts[:, 1:]] == -100)  # no label crosses into the next example
        assert torch.all(labels[:, -1] == -100)
        keep = labels[:, :-1] != -100
        assert torch.equal(labels[:, :-1][keep], ids[:, 1:][keep])  # labels are the next tokens
        pad = ids == tok.pad_id
        assert torch.all(labels[pad] == -100)
        assert torch.all((pos[:, 1:] == pos[:, :-1] + 1) | starts[:, 1:])
        assert (starts.sum(1) > 2).any()  # several examples share a row


def test_over_long_examples_are_truncated_and_counted(tmp_path, tok, caplog):
    recs = instruction_records(4) + [{"instruction": "x" * 400, "output": "never seen"},
                                     {"instruction": "short", "output": "y" * 600}]
    loader = make(write_jsonl(tmp_path / "long.jsonl", recs), tok, pack=False, batch_size=5)
    assert loader.stats["truncated"] == 2 and loader.stats["dropped"] == 1 and loader.stats["examples"] == 5
    assert "truncated" in caplog.text
    batch = next(loader)
    assert batch["input_ids"].shape == (5, SEQ)
    assert any(t.startswith("y" * 20) for t in label_texts(batch, tok))


def test_state_of_other_settings_or_another_loader_is_a_clear_error(files, tok):
    paths = list(files)
    loader = make(paths, tok)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(DataError, match=f"saved with seq_len {SEQ}, pack True, this run has seq_len {2 * SEQ}, pack True"):
        make(paths, tok, seq_len=2 * SEQ).load_state_dict(state)
    with pytest.raises(DataError, match="not a sft loader state"):
        make(paths, tok).load_state_dict({**state, "kind": "pretrain"})
    resumed = make(paths, tok)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # tokens seen included


def test_exact_resume_and_other_rank_counts(files, tok):
    paths = list(files)
    straight = [next(make(paths, tok, batch_size=8)) for _ in range(1)]
    ref_loader = make(paths, tok, batch_size=8)
    ref = torch.cat([next(ref_loader)["input_ids"] for _ in range(12)])  # crosses several epochs
    old = [make(paths, tok, batch_size=4, rank=r, world_size=2) for r in range(2)]
    before = [[next(loader) for _ in range(5)] for loader in old]
    state = json.loads(json.dumps(old[0].state_dict()))
    assert state == old[1].state_dict()
    for world in (1, 4):
        new = [make(paths, tok, batch_size=8 // world, rank=r, world_size=world) for r in range(world)]
        for loader in new:
            loader.load_state_dict(state)
        after = [[next(loader) for _ in range(7)] for loader in new]
        seen = torch.cat([torch.cat([b["input_ids"] for b in step]) for step in zip(*before)]
                         + [torch.cat([b["input_ids"] for b in step]) for step in zip(*after)])
        assert torch.equal(seen, ref)
        assert new[0].tokens_seen_per_source() == ref_loader.tokens_seen_per_source()
    assert torch.equal(straight[0]["input_ids"], ref[:8])


def test_bad_records(tmp_path, tok):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{oops\n{"instruction": "c", "output": "d"}\n')
    assert make(path, tok, pack=False).stats["bad_lines"] == 1
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: malformed JSON"):
        make(path, tok, on_bad_line="error")
    write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"wrong\.jsonl:1: expected 'instruction' and 'output'"):
        make(tmp_path / "wrong.jsonl", tok)
    write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"role\.jsonl:1: message 0"):
        make(tmp_path / "role.jsonl", tok)
    with pytest.raises(DataError, match="not found"):
        make(tmp_path / "missing.jsonl", tok)


def test_alpaca_json_array(tmp_path, tok):
    (tmp_path / "alpaca.json").write_text(json.dumps(instruction_records(5)))
    assert make(tmp_path / "alpaca.json", tok).stats["examples"] == 5
