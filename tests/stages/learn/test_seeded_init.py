"""Same seed, same weights, even when a local flow builds networks in several threads at once."""

import threading

import torch

from stages.learn.models import build_model, seeded_init


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_concurrent_builds_get_their_own_seeds_weights():
    build = lambda: build_model("convnet3", (1, 32, 32), 10, 64)  # noqa: E731  long enough an init to interleave
    want = {s: weights(seeded_init(s, build)) for s in range(4)}
    wrong, errors = [], []

    def worker(s):
        try:
            for _ in range(15):
                if not torch.equal(weights(seeded_init(s, build)), want[s]):
                    wrong.append(s)
        except Exception as exc:  # a failure in a thread must fail the test, not vanish
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong, (errors, wrong)
    assert not torch.equal(want[0], want[1])


def test_the_global_rng_is_left_as_it_was():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    seeded_init(0, lambda: build_model("small_cnn", (1, 8, 8), 10))
    assert torch.equal(torch.rand(3), expected)
