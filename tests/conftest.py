import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def small_tokenizer():
    """A 512-token BPE trained on part of the built-in validation split (quick to build)."""
    from mambascope.data import load_corpus
    from mambascope.models.tokenizer import train_tokenizer

    return train_tokenizer(load_corpus("builtin", "validation").texts[:300], vocab_size=512)


@pytest.fixture(scope="session")
def small_checkpoints(tmp_path_factory, small_tokenizer):
    """Random Mamba-1, Mamba-2 and GPT-2 models with the small tokenizer, saved as HF checkpoints."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    special = {"bos_token_id": small_tokenizer.bos_token_id, "eos_token_id": small_tokenizer.eos_token_id}
    models = {
        "mamba": MambaForCausalLM(MambaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, state_size=8,
                                              **special)),
        "mamba2": Mamba2ForCausalLM(Mamba2Config(vocab_size=512, hidden_size=32, num_hidden_layers=2, state_size=8,
                                                 head_dim=8, num_heads=8, n_groups=1, chunk_size=16, **special)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                           **special)),
    }
    paths = {}
    for kind, model in models.items():
        path = tmp_path_factory.mktemp(f"ckpt-{kind}")
        model.save_pretrained(path)
        small_tokenizer.save_pretrained(path)
        paths[kind] = str(path)
    return paths


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models are dominated by per-op overhead, which extra threads only add to on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
