"""The offline sample corpus and its tokenizer, so a newcomer can train without downloading anything.

    python -m corpus.sample --out data/sample [--vocab_size 4096] [--target_mb 4] [--seed 0]

Built from the running Python's standard library, in the RedPajama-1T-Sample layout:
    out/corpus/github_sample.jsonl      one record per .py file: {"text": code, "meta": {"source": "github", ...}}
    out/corpus/wikipedia_sample.jsonl   one record per module: its docstrings as prose ("source": "wikipedia")
    out/tokenizer/                      a Llama-style SentencePiece BPE (tokenizer.model) + HF tokenizer files
    out/manifest.json                   parameters and content hashes; written last, so it marks a finished build
The same Python version, parameters and seed give identical bytes; a re-run that finds a matching manifest
writes nothing.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import io
import json
import os
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

from corpus.errors import DataError
from corpus.tokenizer import SPM_FILE, SentencePieceTokenizer, _write_atomic

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
MAX_FILE_BYTES = 200_000  # the few larger stdlib files are generated data tables (pydoc_data/topics.py)
PROSE_SHARE = 0.5  # of target_mb; code fills whatever prose leaves over
MAX_SENTENCES = 300_000  # lines given to the tokenizer trainer, so training stays well under a minute
MIN_VOCAB = 300  # 3 special + 256 byte pieces + the corpus's characters; sentencepiece checks the exact bound
SLICES = ("github", "wikipedia")
FORMAT = 1  # bump when the output of a given (python, vocab_size, target_mb, seed) changes


@dataclasses.dataclass(frozen=True)
class SamplePaths:
    corpus_dir: Path
    tokenizer_dir: Path  # an HF tokenizer folder that also holds tokenizer.model
    tokenizer_model: Path
    manifest: Path
    up_to_date: bool = False  # True when the call found a finished build and wrote nothing


def build_sample(out_dir, *, vocab_size: int = 4096, target_mb: float = 4.0, seed: int = 0) -> SamplePaths:
    out_dir = Path(out_dir)
    paths = SamplePaths(out_dir / "corpus", out_dir / "tokenizer", out_dir / "tokenizer" / SPM_FILE,
                        out_dir / "manifest.json")
    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size={vocab_size} is too small: a byte-fallback tokenizer needs at least "
                        f"{MIN_VOCAB} (3 special + 256 byte pieces + characters)")
    if not target_mb > 0:
        raise DataError(f"target_mb={target_mb} must be positive")
    params = {"format": FORMAT, "python": platform.python_version(), "vocab_size": vocab_size,
              "target_mb": target_mb, "seed": seed}
    if _manifest_matches(out_dir, params):
        return dataclasses.replace(paths, up_to_date=True)
    try:
        paths.corpus_dir.mkdir(parents=True, exist_ok=True)
        paths.tokenizer_dir.mkdir(parents=True, exist_ok=True)
        paths.manifest.unlink(missing_ok=True)  # until the new one is written, the build is unfinished
    except OSError as e:
        raise DataError(f"cannot write the sample to {str(out_dir)!r}: {e.strerror or e}") from e

    slices = _select(_stdlib_sources(), int(target_mb * 1e6), seed)
    stats = {}
    for name in SLICES:
        data = "".join(_jsonl(text, meta) for text, meta in slices[name]).encode()
        _write_atomic(paths.corpus_dir / f"{name}_sample.jsonl", data)
        stats[name] = {"records": len(slices[name]), "bytes": len(data)}

    lines = [line for name in SLICES for text, _ in slices[name] for line in text.splitlines() if line.strip()]
    if len(lines) > MAX_SENTENCES:
        keep = sorted(random.Random(seed).sample(range(len(lines)), MAX_SENTENCES))
        lines = [lines[i] for i in keep]
    tok = SentencePieceTokenizer(_train_spm(lines, vocab_size), str(paths.tokenizer_model))
    tok.save_pretrained(paths.tokenizer_dir)
    stats["vocab_size"] = tok.vocab_size

    files = sorted(p.relative_to(out_dir).as_posix() for d in (paths.corpus_dir, paths.tokenizer_dir)
                   for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    manifest = {"params": params, "stats": stats, "sha256": {f: _sha256(out_dir / f) for f in files}}
    _write_atomic(paths.manifest, (json.dumps(manifest, indent=2) + "\n").encode())
    return paths


def read_manifest(out_dir) -> dict:
    return json.loads((Path(out_dir) / "manifest.json").read_text())


def _manifest_matches(out_dir: Path, params: dict) -> bool:
    try:
        manifest = read_manifest(out_dir)
        return manifest["params"] == params and all(
            _sha256(out_dir / f) == digest for f, digest in manifest["sha256"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stdlib_sources() -> list[tuple[str, str]]:
    """(path relative to the stdlib, text) for its UTF-8 .py files, test suites and third-party code left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            # _sysconfigdata holds this machine's build paths
            if not name.endswith(".py") or name.startswith(("test_", "_sysconfigdata")):
                continue
            path = Path(dirpath) / name
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            try:
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip():
                sources.append((path.relative_to(root).as_posix(), text))
    return sorted(sources)


def _select(sources: list[tuple[str, str]], target_bytes: int, seed: int) -> dict[str, list[tuple[str, dict]]]:
    """Seeded choice of (text, meta) records filling about target_bytes of jsonl, prose first; sorted by path."""
    version = ".".join(platform.python_version_tuple()[:2])
    order = list(sources)
    random.Random(seed).shuffle(order)
    chosen, used = {name: [] for name in SLICES}, 0

    def take(name: str, text: str, meta: dict, budget: float):
        nonlocal used
        size = len(_jsonl(text, meta))
        if used + size <= budget:
            chosen[name].append((text, meta))
            used += size

    for path, code in order:
        if used > target_bytes * PROSE_SHARE * 0.99:
            break  # full enough; parsing the rest would only slow small builds down
        if prose := _docstrings(path, code):
            meta = {"source": "wikipedia", "title": _module_name(path), "path": path, "language": "en",
                    "origin": "docstrings", "python": version}
            take("wikipedia", prose, meta, target_bytes * PROSE_SHARE)
    for path, code in order:
        take("github", code, {"source": "github", "path": path, "language": "Python", "python": version},
             target_bytes)
    return {name: sorted(records, key=lambda r: r[1]["path"]) for name, records in chosen.items()}


def _jsonl(text: str, meta: dict) -> str:
    return json.dumps({"text": text, "meta": meta}) + "\n"


def _module_name(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _docstrings(path: str, code: str) -> str:
    """A module's docstrings as an article: its name, its own docstring, then each class's and function's."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return ""
    module = _module_name(path)
    sections = []

    def visit(node, prefix: str):
        doc = ast.get_docstring(node)
        if doc:
            sections.append(f"{prefix}\n\n{doc}")
        for child in node.body:
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{prefix}.{child.name}")

    visit(tree, module)
    return "\n\n".join(sections)


def _train_spm(lines: list[str], vocab_size: int) -> bytes:
    """A Llama-2-style SentencePiece BPE model, as bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            allow_whitespace_only_pieces=True, character_coverage=0.99995, max_sentencepiece_length=16,
            input_sentence_size=MAX_SENTENCES, shuffle_input_sentence=False, num_threads=os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].split("] ", 1)[-1]  # drop sentencepiece's source location
        raise DataError(f"sentencepiece could not train a vocab_size={vocab_size} tokenizer on this sample: "
                        f"{reason}") from e
    # The thread count is recorded in the model but does not change the pieces: clear it, so that every
    # machine writes the same bytes.
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(model.getvalue())
    proto.trainer_spec.ClearField("num_threads")
    return proto.SerializeToString()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m corpus.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder, e.g. data/sample")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--target_mb", type=float, default=4.0, help="corpus size in MB (1e6 bytes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        paths = build_sample(args.out, vocab_size=args.vocab_size, target_mb=args.target_mb, seed=args.seed)
    except DataError as e:
        sys.exit(f"corpus.sample: error: {e}")
    except OSError as e:
        sys.exit(f"corpus.sample: error: cannot write {e.filename or args.out}: {e.strerror or e}")
    stats = read_manifest(args.out)["stats"]
    slices = ", ".join(f"{name} {stats[name]['records']} records {stats[name]['bytes'] / 1e6:.2f} MB"
                       for name in SLICES)
    verb = "is up to date (nothing written)" if paths.up_to_date else \
        f"written in {time.perf_counter() - start:.1f}s"
    print(f"{args.out} {verb}: {slices}; tokenizer vocab {stats['vocab_size']} in {paths.tokenizer_dir}")


if __name__ == "__main__":
    main()
