import pytest
import torch

from tokenmerge.core.attention import key_metric, proportional_attention, size_bias


def explicit_attention(q, k, v, log_size, scale):
    scores = (q @ k.transpose(-1, -2)) * scale
    if log_size is not None:
        scores = scores + log_size[:, None, None, :]
    return scores.softmax(dim=-1) @ v


@pytest.mark.parametrize("impl", ["fold", "bias", "auto"])
@pytest.mark.parametrize("head_dim", [8, 64, 30])
def test_proportional_attention_is_exact(impl, head_dim):
    B, H, N = 2, 3, 19
    q, k, v = (torch.randn(B, H, N, head_dim) for _ in range(3))
    size = torch.randint(1, 9, (B, N, 1)).float()
    log_size = size_bias(size)
    got = proportional_attention(q, k, v, log_size, impl=impl)
    want = explicit_attention(q, k, v, log_size, head_dim ** -0.5)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_custom_scale_is_honoured_when_folded():
    q, k, v = (torch.randn(1, 2, 7, 16) for _ in range(3))
    log_size = torch.rand(1, 7)
    got = proportional_attention(q, k, v, log_size, impl="fold", scale=0.3)
    torch.testing.assert_close(got, explicit_attention(q, k, v, log_size, 0.3), atol=2e-6, rtol=1e-5)


def test_size_bias_gives_merged_tokens_their_patches_attention():
    # A token of size 2 must draw the attention of two identical size-1 tokens together.
    q = torch.randn(1, 1, 1, 8)
    k_one, v_one = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    k_other, v_other = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    duplicated = proportional_attention(
        q, torch.cat([k_one, k_one, k_other], 2), torch.cat([v_one, v_one, v_other], 2)
    )
    merged = proportional_attention(
        q, torch.cat([k_one, k_other], 2), torch.cat([v_one, v_other], 2),
        size_bias(torch.tensor([[[2.0], [1.0]]])), impl="fold",
    )
    torch.testing.assert_close(merged, duplicated, atol=1e-6, rtol=1e-5)


def test_no_sizes_is_plain_sdpa_bit_for_bit():
    q, k, v = (torch.randn(2, 3, 11, 16) for _ in range(3))
    assert torch.equal(
        proportional_attention(q, k, v, None),
        torch.nn.functional.scaled_dot_product_attention(q, k, v),
    )
    assert size_bias(None) is None


def test_unknown_impl_is_error():
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="'fold', 'bias'"):
        proportional_attention(q, q, q, torch.zeros(1, 3), impl="flash")


def test_key_metric_averages_heads():
    k = torch.randn(2, 4, 5, 8)
    torch.testing.assert_close(key_metric(k), k.mean(1))
