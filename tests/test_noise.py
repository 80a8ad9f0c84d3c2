"""Host noise: ``generation_noise`` reuses one Philox bit generator per thread, and its
streams must stay exactly ``image_rng``'s (seed, image index) streams."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fewstep.runtime import noise


def expected(seed: int, indices: range, shape: tuple[int, ...], steps: int
             ) -> tuple[np.ndarray, np.ndarray | None]:
    x = np.stack([noise.image_rng(seed, i).standard_normal(shape, dtype=np.float32)
                  for i in indices])
    if not steps:
        return x, None
    rngs = [noise.image_rng(seed, i) for i in indices]
    for r in rngs:
        r.standard_normal(shape, dtype=np.float32)
    s = np.stack([r.standard_normal((steps, *shape), dtype=np.float32) for r in rngs])
    return x, s


@pytest.mark.parametrize("seed", [0, 7, 2**63, noise.MAX_SEED])
@pytest.mark.parametrize("steps", [0, 3])
def test_generation_noise_is_image_rng_stream(seed: int, steps: int) -> None:
    for indices in (range(1), range(5, 8), range(0, 3)):
        x, s = noise.generation_noise(seed, indices, (3, 8, 8), steps)
        want_x, want_s = expected(seed, indices, (3, 8, 8), steps)
        np.testing.assert_array_equal(x, want_x)
        if steps:
            assert s is not None and want_s is not None
            np.testing.assert_array_equal(s, want_s)
        else:
            assert s is None
    # one image does not depend on its batch, nor on what was drawn before it
    a, _ = noise.generation_noise(seed, range(4), (2, 4))
    b, _ = noise.generation_noise(seed, range(2, 3), (2, 4))
    np.testing.assert_array_equal(a[2], b[0])


def test_threads_draw_their_own_streams() -> None:
    """Each thread has its own bit generator: interleaved calls never mix streams."""
    seeds = [1, 2, 3, 4]
    want = {s: expected(s, range(2), (3, 16, 16), 2) for s in seeds}
    errors: list[str] = []
    start = threading.Barrier(len(seeds))

    def work(seed: int) -> None:
        start.wait()
        for _ in range(200):
            x, st = noise.generation_noise(seed, range(2), (3, 16, 16), 2)
            if not (np.array_equal(x, want[seed][0]) and np.array_equal(st, want[seed][1])):
                errors.append(f"seed {seed}: another stream")
                return

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_bad_seeds_are_refused() -> None:
    for bad in (-1, noise.MAX_SEED + 1):
        with pytest.raises(ValueError, match=r"outside 0\.\.2\*\*64-1"):
            noise.generation_noise(bad, range(1), (2,))
