"""Build a tiny, deterministic Llama model with a byte-level BPE tokenizer.

Nothing can be downloaded from a model hub on the machines we test on, so the tests,
the demo and the CPU benchmarks generate their model. It is a real ``LlamaForCausalLM``
(random weights, fixed seed) that vLLM serves like any other checkpoint:

* hidden 256, 4 heads of 64 (vLLM's CPU attention rejects head_dim 16), 2 KV heads,
  2 layers, float32; a wider-than-default init so greedy argmax has clear margins and
  does not flip with batch composition.
* a byte-level BPE tokenizer whose alphabet is all 256 bytes but whose merges are
  learnt from mostly-ASCII text: accented letters, CJK and emoji stay split across
  several byte tokens. Random weights emit such byte tokens freely, so the P/D seam
  lands inside a UTF-8 character often, which is exactly what the stitcher must get
  right.
* a chat template, so ``/v1/chat/completions`` works.

``small`` is the same recipe at a shape whose KV and compute are not negligible on a
CPU (8 layers, hidden 1024, 8 KV heads of 128: 64 KiB of KV per token, ~100M weights):
benchmarks that weigh moving KV against recomputing it use it.

Usage: ``python -m devkit.tiny_model OUTDIR [tiny|small]``. Re-running with the same
OUTDIR is a no-op when the stamp file matches.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

STAMP = "pdproxy-tiny-llama-v1"

SHAPES = {
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "small": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
}

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his "
    "from at which but have an they you were her she there been one all we their "
    "has would when if so no will more can out other into some could them time these "
    "two may then first any like now my such make over our even most me state after "
    "also made many did must before back see through way where get much go well your "
    "know should down work year because come people just say each those take day good "
    "how long little own very great old new right thing world life hand part child eye "
    "woman place week case point government company number group problem fact river "
    "mountain engine proxy server request token cache decode prefill stream model "
    "network kernel memory queue socket signal buffer packet latency router cluster"
).split()

# Rare non-ASCII words: present so the tokenizer knows their bytes, too rare to merge.
RARE = ["café", "naïve", "Zürich", "東京", "数据", "🙂", "über", "façade", "señor", "日本語"]


def corpus() -> list[str]:
    rng = random.Random(1234)
    lines = []
    for _ in range(4000):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 18))]
        if rng.random() < 0.05:
            words.insert(rng.randrange(len(words)), rng.choice(RARE))
        text = " ".join(words)
        lines.append(text[0].upper() + text[1:] + rng.choice([".", "?", "!", ",", ":"]))
    return lines


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build(outdir: str | Path, shape: str = "tiny") -> Path:
    out = Path(outdir)
    stamp = out / "pdproxy_stamp.txt"
    label = STAMP if shape == "tiny" else f"{STAMP}-{shape}"
    if stamp.exists() and stamp.read_text().strip() == label:
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=768,
        min_frequency=40,  # rare words' bytes never merge
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    assert len(fast.encode("東", add_special_tokens=False)) == 3, "CJK must stay split"

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        **SHAPES[shape],
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 2:
                continue
            std = 1.0 if name.startswith("lm_head") else 0.08 if "embed" in name else 0.06
            param.copy_(torch.randn(param.shape, generator=gen) * std)
        # EOS stays possible but rare, so most outputs run to max_tokens.
        model.lm_head.weight[fast.eos_token_id].mul_(0.2)
    model.save_pretrained(out)
    # Random init may leave sampling defaults behind; vLLM reads this file.
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id})
    )
    stamp.write_text(label + "\n")
    return out


def word_token_ids(model_dir: str | Path) -> list[int]:
    """Token ids that are whole words of the training text with a leading space, and
    sentence punctuation. Generating only these (vLLM's ``allowed_token_ids``) turns
    the random model's output into random words instead of stray bytes of characters."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    known = set(WORDS)
    ids = []
    for token_id in range(tok.get_vocab_size()):
        text = tok.decode([token_id])
        if (text.startswith(" ") and text[1:] in known) or text in (".", ","):
            ids.append(token_id)
    return ids


if __name__ == "__main__":
    print(
        build(
            sys.argv[1] if len(sys.argv) > 1 else ".cache/tiny-llama",
            sys.argv[2] if len(sys.argv) > 2 else "tiny",
        )
    )
