"""The calibration engine (graphquant.calibration): statistics in TensorFlow, methods against numpy oracles,
the same ranges on the Keras and the SavedModel path."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphquant as gq
import graphquant.graph as gg
from graphquant import calibration as cal
from graphquant.formats import Affine, FixedPoint
from graphquant.keras.layers import Quantize

RNG = np.random.RandomState(0)


@pytest.fixture(autouse=True)
def _reseed():
    """Every test draws the same numbers whichever tests ran before it in its process (xdist)."""
    RNG.seed(0)


def _observe(batches, **kw):
    o = cal.Observer("p", **kw)
    try:
        f = tf.function(lambda x: o.update(x))
        for b in batches:
            f(tf.constant(b))
        return o.stats()
    finally:
        o.release()


# --------------------------------------------------------------------------- statistics
def test_histogram_is_exact_whatever_the_batch_order():
    """Growing the range merges bins exactly: the histogram equals numpy's over the final range."""
    batches = [RNG.normal(size=500).astype("float32") * s for s in (0.01, 1.0, 37.0, 0.5)]
    batches[1][3] = np.nan
    batches[2][7] = -np.inf
    for order in (batches, batches[::-1]):
        s = _observe(order)
        x = np.concatenate(batches)
        fin = x[np.isfinite(x)]
        assert (s.lo[0], s.hi[0]) == (fin.min(), fin.max())  # exact min/max
        assert s.seen == x.size and s.nonfinite == 2
        e = int(s.exp[0])
        assert 2.0 ** (e - 1) < np.abs(fin).max() <= 2.0**e
        ref, _ = np.histogram(fin.astype(np.float64), bins=cal.NUM_BINS, range=(-(2.0**e), 2.0**e))
        np.testing.assert_array_equal(s.hist[0], ref)


def test_row_table_counts_the_batches_each_exponent_binned():
    """The per-tensor histogram's rows: one per batch exponent, its last column counting the batches binned
    in it, which is how the read finds the few rows to gather; the rows hold every sampled value."""
    scales = (1.5, 1.25, 300.0, 1.5)  # exponents 1, 1, 9 (whatever the draw: |x| <= 1.5 * 1 < 2), 1
    batches = [np.clip(RNG.normal(size=(4, 300)), -1, 1).astype("float32") * s for s in scales]
    o = cal.Observer("p")
    try:
        f = tf.function(lambda x: o.update(x))
        for b in batches:
            f(tf.constant(b))
        exps = [int(np.ceil(np.log2(np.abs(b).max()))) for b in batches]
        column = tf.raw_ops.ResourceGatherNd(resource=o._handle("table"), indices=cal._LAST_COLUMN, dtype=tf.int64).numpy()
        expected = np.zeros_like(column)
        for e in exps:
            expected[e - cal._E_MIN] += 1
        np.testing.assert_array_equal(column, expected)
        used, rows = cal._used_rows(o._handle("table"))
        assert used.tolist() == sorted({e - cal._E_MIN for e in exps})
        assert rows.shape == (len(used), cal.NUM_BINS + 1) and rows.sum() == sum(b.size for b in batches)
        s = o.stats()
        assert s.seen == sum(b.size for b in batches) and s.hist.sum() == s.seen
    finally:
        o.release()


def test_order_keys_sort_like_the_floats_and_invert_exactly():
    """A per-tensor observer keeps min and max in its int64 table as order keys: they must sort exactly as the
    float32 values (denormals, signed zeros, infinities, neighbours one ulp apart) and decode to the same bits."""
    f32 = np.finfo(np.float32)
    special = [-np.inf, -f32.max, -1.0, np.nextafter(np.float32(-1), np.float32(0)), -f32.tiny, -f32.smallest_subnormal,
               -0.0, 0.0, f32.smallest_subnormal, f32.tiny, 1.0, np.nextafter(np.float32(1), np.float32(2)), f32.max, np.inf]
    x = np.concatenate([np.array(special, np.float32), RNG.standard_cauchy(2000).astype(np.float32)])
    keys = cal._order_key(tf.constant(x)).numpy()
    assert keys.dtype == np.int64
    order = np.argsort(keys, kind="stable")
    assert np.all(np.diff(x[order]) >= 0)  # sorted by key is sorted by value
    assert keys[6] < keys[7]  # -0.0 just below 0.0
    np.testing.assert_array_equal(cal._from_order_key(keys).view(np.int32), x.view(np.int32))  # the same bits back


def test_anonymous_and_shared_observers():
    """An observer's variables are anonymous (a traced function captures their handles) unless ``shared``:
    then they have names a graph refers to, created only when first needed (a loaded SavedModel's observers
    are created under the names the load gives them, not twice)."""
    anon = cal.Observer("p")
    with pytest.raises(ValueError, match="'p'.*shared=True"):
        anon.shared_name("table")
    with pytest.raises(ValueError, match="shared=True"):
        anon.rebind("_load_1")
    named = cal.Observer("q", shared=True)

    def exists(name, dtype):
        h = tf.raw_ops.VarHandleOp(dtype=dtype, shape=None, shared_name=name, container="")
        return bool(tf.raw_ops.VarIsInitializedOp(resource=h))

    try:
        assert named.keys == ("table",)  # per tensor: one variable
        assert not exists(named.shared_name("table"), tf.int64)  # not created yet
        named.initialise()
        assert exists(named.shared_name("table"), tf.int64)
        named.rebind("_load_7")
        assert named.shared_name("table").endswith("/table_load_7")
        assert exists(named.shared_name("table"), tf.int64)
        assert not exists(named.shared_name("table")[: -len("_load_7")], tf.int64)  # the first one freed
        for o in (anon, named):
            o.update(tf.constant([[-2.0, 3.0]]))
            s = o.stats()
            assert (s.lo[0], s.hi[0], s.seen) == (-2.0, 3.0, 2)
    finally:
        anon.release()
        named.release()
    assert not exists(named.shared_name("table"), tf.int64)


@pytest.mark.parametrize("shape", [(), (7,), (5, 9000), (3, 40, 40, 24), (2, 40, 40, 12), (2, 7, 7, 1280), (1, 3, 5000),
                                   (4, 64, 64, 3), (0, 128, 128, 8), (2, 1, 30030, 2)])
def test_sample_spec_constant_and_computed_agree(shape):
    """The sample's [stride, channels] as a constant from the static shape (Keras, graphs with known shapes)
    and as computed from the shape tensor (graphs without) are the same, and follow the documented rule."""
    computed = cal._sample_spec_ops(tf.constant(shape, tf.int32)).numpy().tolist()
    static = cal.static_sample_spec([None, *shape[1:]] if shape else shape)
    if static is None:  # the width is the batch (rank 2, sampled): known only with the batch
        assert len(shape) == 2
        static = cal.static_sample_spec(shape)
    if shape and shape[0] == 0:  # an empty batch samples nothing either way
        return
    assert list(static) == computed
    per_example = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
    width = shape[-2] if len(shape) >= 2 else 1
    k = _sample_stride(per_example, width)
    assert computed == ([1, 1] if k == 1 else [k, shape[-1]])


def test_histogram_bin_edges_and_float32_extremes():
    """Values on bin edges, at exactly 2**e (the last bin's closed edge) and at float32's extremes
    (exponent 128) land where numpy puts them, through the merge of every batch's exponent."""
    big = np.finfo(np.float32).max
    batches = [np.array(b, "float32") for b in (
        [1.0, -1.0, 0.5, -0.5, 2.0**-10, -(2.0**-10), 0.0, -0.0, 2.0**-40, -(2.0**-40)],
        [4.0, -3.0, 2.0, 3.0 - 2.0**-8, -(2.0**-9)],
        [2.0**-70, -(2.0**-70)],  # below 2**_E_MIN: the two central bins
    )]  # fmt: skip
    x = np.concatenate(batches)
    for extra in ([], [np.array([big, -big, 1e30], "float32")]):
        s = _observe(batches + extra)
        data = np.concatenate([x] + extra).astype(np.float64)
        e = int(s.exp[0])
        assert e == (128 if extra else 2)
        ref, _ = np.histogram(data, bins=cal.NUM_BINS, range=(-(2.0**e), 2.0**e))
        np.testing.assert_array_equal(s.hist[0], ref)


def test_per_channel_statistics():
    x = RNG.normal(size=(60, 50, 3)).astype("float32") * np.array([1.0, 10.0, 0.1], "float32")
    s = _observe([x[:3], x[3:]], axis=-1, channels=3)
    flat = x.reshape(-1, 3)
    np.testing.assert_array_equal(s.lo, flat.min(0))
    np.testing.assert_array_equal(s.hi, flat.max(0))
    assert s.hist.shape == (3, cal.NUM_BINS) and (s.hist.sum(1) == 3000).all()
    lo, hi = cal.range_of(s, "percentile", percentile=90.0)
    for c in range(3):
        assert lo[c] < 0 < hi[c]  # (else the range is widened to include 0)
        _assert_near_percentile(flat[:, c], [lo[c], hi[c]], [10, 90], s.bin_width(c))
    s = _observe([x], axis=1, channels=50)  # a middle axis
    np.testing.assert_array_equal(s.hi, x.max(axis=(0, 2)))
    with pytest.raises(ValueError, match="'p': axis 1 has 50 channels, the observer 5"):
        _observe([x], axis=1, channels=5)


def _sample_stride(example_size, width):
    """The documented rule, independently: the first prime >= ceil(size / HISTOGRAM_SAMPLE)
    that does not divide the width, the next-to-last axis (1 when no sampling is needed)."""
    want = -(-example_size // cal.HISTOGRAM_SAMPLE)
    if want <= 1:
        return 1
    k = want
    while any(k % d == 0 for d in range(2, int(k**0.5) + 1)) or width % k == 0:
        k += 1
    return k


def _sample(x, k):
    """The documented sample, independently: whole positions (the last axis), the first of every
    complete group of ``k`` positions."""
    pos = x.reshape(-1, x.shape[-1])
    return pos[: len(pos) // k * k : k].reshape(-1)


def test_per_tensor_histogram_samples_every_channel_alike():
    """Large examples: the histogram holds a sample of whole positions; min/max/counts see every value."""
    x = RNG.normal(size=(3, 40, 40, 24)).astype("float32")  # 38,400 values per example
    x[..., 5] = 3.0  # one channel apart: in the sample as often as every other channel
    x[0, 0, 1, 1] = 1000.0  # off the sample (position 1): still the exact max
    x[2, 0, 0, 7] = np.nan  # in the sample: dropped from the histogram, counted
    k = _sample_stride(40 * 40 * 24, 40)
    assert k == 11  # ceil(38400 / 4096) = 10, and 11 is the first prime from there not dividing the width 40
    s = _observe([x[:2], x[2:]])
    assert (s.lo[0], s.hi[0]) == (np.nanmin(x), 1000.0) and s.seen == x.size and s.nonfinite == 1
    sample = np.concatenate([_sample(x[:2], k), _sample(x[2:], k)])
    assert sample.size == (3200 // 11 + 1600 // 11) * 24 and np.isnan(sample).sum() == 1
    fin = sample[np.isfinite(sample)].astype(np.float64)
    e = int(s.exp[0])
    assert e == 10  # the range covers the exact max, not only the sample's
    ref, _ = np.histogram(fin, bins=cal.NUM_BINS, range=(-(2.0**e), 2.0**e))
    np.testing.assert_array_equal(s.hist[0], ref)
    # channel 5's share of the histogram is its share of the data
    assert abs(s.hist[0][cal.NUM_BINS // 2 + 3] / s.hist[0].sum() - 1 / 24) < 2e-3


# --------------------------------------------------------------------------- methods against numpy
def _assert_near_percentile(x, got, qs, w):
    """Each ``got`` within one bin width ``w`` of the order statistics of ``x`` around the rank of its
    percentile ``q`` (numpy's percentile interpolates between two of them, which where data is sparse,
    a Cauchy tail or a few thousand values, can lie more than a bin apart)."""
    xs = np.sort(np.asarray(x, np.float64))
    for g, q in zip(got, qs):
        r = q / 100 * (xs.size - 1)
        a, b = xs[max(int(np.floor(r)) - 1, 0)], xs[min(int(np.ceil(r)) + 1, xs.size - 1)]
        assert a - w <= float(g) <= b + w, (q, float(g), a, b, w)


@pytest.mark.parametrize("p", [99.0, 99.9, 90.0])
def test_percentile_within_one_bin_of_numpy(p):
    x = np.concatenate([RNG.normal(size=20000), RNG.standard_cauchy(size=200)]).astype("float32")
    s = _observe(np.split(x, 8))
    lo, hi = cal.range_of(s, "percentile", percentile=p)
    ref = np.percentile(x, [100 - p, p])
    w = s.bin_width()
    _assert_near_percentile(x, [lo, hi], [100 - p, p], w)
    assert cal.range_of(s, "percentile", percentile=100.0) == cal.range_of(s, "minmax")  # p=100 is exactly minmax


def _fake_quant(x, lo, hi, steps, fixed=False):
    step = (hi - lo) / steps
    top = steps - 1 if fixed else steps
    return lo + np.clip(np.round((x - lo) / step), 0, top) * step


@pytest.mark.parametrize("fmt", [Affine(4), Affine(8), FixedPoint(4, range=(0.0, 1.0))], ids=str)
def test_mse_matches_a_brute_force_search_on_the_data(fmt):
    x = np.abs(RNG.standard_t(3, size=40000)).astype("float32")  # heavy tail: clipping pays
    s = _observe(np.split(x, 4))
    lo, hi = (float(v) for v in cal.range_of(s, "mse", fmt=fmt))
    steps, fixed = (2**fmt.bits, True) if isinstance(fmt, FixedPoint) else (fmt.quant_max - fmt.quant_min, False)
    x64 = x.astype(np.float64)

    def err(a, b):
        return float(np.mean((_fake_quant(x64, a, b, steps, fixed) - x64) ** 2))

    cands = [(0.0, k / cal.MSE_CANDIDATES * x64.max()) for k in range(1, cal.MSE_CANDIDATES + 1)]
    best = min(err(a, b) for a, b in cands)
    assert err(lo, hi) <= 1.03 * best
    if fmt.bits == 4:  # few levels: clipping the tail pays
        assert hi < 0.5 * x.max() and err(lo, hi) < 0.5 * err(0.0, float(x.max()))


def _mse_by_definition(h, width, lo, hi, fmt):
    """The "mse" search written out: every candidate range against every bin centre."""
    steps, symmetric, fixed = cal._grid(fmt)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    x = (np.arange(cal.NUM_BINS) - cal.NUM_BINS // 2 + 0.5) * width
    nz = h > 0
    x, w = x[nz], h[nz].astype(np.float64)
    a = np.arange(1, cal.MSE_CANDIDATES + 1)[:, None] / cal.MSE_CANDIDATES
    c_lo, c_hi = a * lo, a * hi
    step = (c_hi - c_lo) / steps
    top = c_hi - step if fixed else c_hi
    inside = (x[None, :] >= c_lo) & (x[None, :] <= top)
    err = np.sum(w * ((x[None, :] - np.clip(x[None, :], c_lo, top)) ** 2 + np.where(inside, step**2 / 12, 0.0)), axis=1)
    best = int(np.argmin(err))
    return float(c_lo[best, 0]), float(c_hi[best, 0])


def test_mse_range_is_the_search_by_definition():
    """``mse_range`` (prefix sums over the bins) picks the same candidate as evaluating every candidate on
    every bin, on histograms of every kind of data and for fixed-point, affine and narrow-range grids."""
    rng = np.random.default_rng(1)
    fmts = [Affine(8), Affine(4), Affine(8, narrow_range=True), FixedPoint(8, range=(0.0, 1.0)), FixedPoint(3, range=(0.0, 1.0))]
    for trial in range(60):
        size = int(rng.integers(10, 50000))
        x = [rng.standard_t(3, size), np.abs(rng.standard_t(2, size)), rng.normal(size=size) * 50,
             np.clip(rng.normal(size=size), 0, 6), -np.abs(rng.normal(size=size))][trial % 5].astype(np.float32)  # fmt: skip
        e = int(np.ceil(np.log2(np.abs(x).max())))
        h, _ = np.histogram(x.astype(np.float64), bins=cal.NUM_BINS, range=(-(2.0**e), 2.0**e))
        width = 2.0 ** (e + 1) / cal.NUM_BINS
        for fmt in fmts:
            args = (h, width, float(x.min()), float(x.max()), fmt)
            assert cal.mse_range(*args) == _mse_by_definition(*args), (trial, fmt)


def _trt_entropy(x, levels, bins=cal.NUM_BINS // 2):
    """TensorRT's procedure written out directly: histogram of |x| on [0, 2**e], one candidate at a time."""
    a = np.abs(x[np.isfinite(x)]).astype(np.float64)
    e = int(np.ceil(np.log2(a.max())))
    hist, edges = np.histogram(a, bins=bins, range=(0, 2.0**e))
    last = int(np.flatnonzero(hist)[-1]) + 1
    best = (np.inf, last)
    for i in range(levels, last + 1):
        p = hist[:i].astype(np.float64)
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        for j in range(levels):
            a0, a1 = j * i // levels, (j + 1) * i // levels
            chunk = hist[a0:a1]
            nz = chunk > 0
            if nz.any():
                q[a0:a1][nz] = chunk.sum() / nz.sum()
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        if (q[m] == 0).any():
            continue
        kl = np.sum(p[m] * np.log(p[m] / q[m]))
        if kl < best[0]:
            best = (kl, i)
    return edges[best[1]]


@pytest.mark.parametrize("fmt", [Affine(8), FixedPoint(8, (-1.0, 1.0))], ids=str)
def test_entropy_matches_a_direct_numpy_implementation(fmt):
    """Affine and FixedPoint activations alike: 2**(bits-1) levels per side for two-signed data."""
    x = np.concatenate([RNG.laplace(size=50000), RNG.normal(size=50) * 30]).astype("float32")
    s = _observe(np.split(x, 5))
    lo, hi = cal.range_of(s, "entropy", fmt=fmt)
    t = _trt_entropy(x, 128)
    assert t < 0.9 * np.abs(x).max()  # the outliers are clipped
    np.testing.assert_allclose([lo, hi], [max(-t, x.min()), min(t, x.max())], rtol=1e-6)
    pos = np.abs(x)  # one-signed data uses the full grid on one side
    s = _observe([pos])
    lo, hi = cal.range_of(s, "entropy", fmt=fmt)
    assert float(lo) == 0.0
    np.testing.assert_allclose(float(hi), min(_trt_entropy(pos, 256), pos.max()), rtol=1e-6)


def test_bad_statistics_name_the_point():
    s = _observe([np.full(4, np.nan, "float32")])
    with pytest.raises(ValueError, match=r"calibration_data: 'p': no finite value \(4 of 4 values were NaN or inf\)"):
        cal.range_of(s, "mse")
    with pytest.raises(ValueError, match="calibration_method must be one of 'minmax', 'percentile', 'mse', 'entropy'"):
        cal.check_method("kl")


# --------------------------------------------------------------------------- both front ends
def _keras_model():
    rng = np.random.RandomState(1)
    x = keras.Input((8, 8, 2), name="x")
    h = keras.layers.Conv2D(4, 3, padding="same", name="c1")(x)
    h = keras.layers.ReLU(name="r1")(h)
    h = keras.layers.Conv2D(3, 3, padding="same", name="c2")(h)
    return _random_weights(keras.Model(x, h, name="two"), rng)


def _random_weights(m, rng):
    for layer in m.layers:
        if layer.weights:
            layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])
    return m


def _export(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("cal") / model.name
    model.export(str(d), verbose=False)
    return model, d


DATA = RNG.normal(size=(70, 8, 8, 2)).astype("float32")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return _export(tmp_path_factory, _keras_model())


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_keras_and_exported_saved_model_calibrate_the_same_ranges(exported, tmp_path, method):
    model, path = exported
    q = gq.quantize_model(model, bits=8, calibration_data=DATA, calibration_method=method)
    r_k = [l.get_range() for l in q.layers if isinstance(l, Quantize)]
    report = gg.convert_saved_model(path, tmp_path / "q", bits=8, calibration_data=DATA, calibration_method=method)
    r_g = list(report.ranges.values())
    assert len(r_k) == len(r_g) == 2
    np.testing.assert_allclose(np.asarray(r_k, np.float32), np.asarray(r_g, np.float32), rtol=2e-7, atol=0)
    if method != "minmax":  # the method matters: not all the same as minmax
        r_mm = [l.get_range() for l in gq.quantize_model(model, bits=8, calibration_data=DATA).layers
                if isinstance(l, Quantize)]  # fmt: skip
        assert not np.allclose(np.asarray(r_k), np.asarray(r_mm))


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_per_channel_ranges_are_the_same_on_both_paths(exported, tmp_path, method):
    """Affine(axis=-1) activations: the SavedModel path observes per channel too (one range per channel,
    the same as the Keras path's), and the converted model computes what the Keras copy computes."""
    model, path = exported
    fmt = Affine(8, axis=-1)
    q = gq.quantize_model(model, format=fmt, calibration_data=DATA, calibration_method=method)
    r_k = [l.get_range() for l in q.layers if isinstance(l, Quantize)]
    report = gg.convert_saved_model(path, tmp_path / "q", format=fmt, calibration_data=DATA, calibration_method=method)
    r_g = list(report.ranges.values())
    assert [np.shape(lo) for lo, _ in r_g] == [(4,), (3,)]
    for (lo_k, hi_k), (lo_g, hi_g) in zip(r_k, r_g):
        np.testing.assert_allclose(np.asarray(lo_k, np.float32), lo_g, rtol=2e-7, atol=0)
        np.testing.assert_allclose(np.asarray(hi_k, np.float32), hi_g, rtol=2e-7, atol=0)
    assert len({float(h) for h in r_g[1][1]}) == 3  # three channels, three ranges
    served = tf.saved_model.load(str(tmp_path / "q")).signatures["serving_default"]
    (key,) = served.structured_input_signature[1]
    (out,) = served(**{key: tf.constant(DATA[:16])}).values()
    np.testing.assert_allclose(out.numpy(), q(DATA[:16], training=False).numpy(), rtol=1e-5, atol=1e-5)
    steps = (np.asarray(r_g[1][1]) - np.asarray(r_g[1][0])) / 255.0  # the output is on each channel's own grid
    per_channel = out.numpy().reshape(-1, 3) / steps
    assert np.abs(per_channel - np.round(per_channel)).max() < 1e-2


def test_per_channel_calibration_needs_a_known_channel_count(tmp_path):
    """A per-channel format at a point whose channel count the graph does not give is refused before any
    batch runs, naming the point."""
    from graphquant.graph.calibrate import RangeCollector

    col = RangeCollector("minmax")
    with pytest.raises(ValueError, match=r"'f/conv'.*per-channel calibration \(axis=-1\).*\[None, 8, None\]"):
        col.observer("f/conv", Affine(8, axis=-1), [None, 8, None])
    assert not col.observers


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_sampled_histograms_are_the_same_on_both_paths(tmp_path, method):
    """Examples larger than HISTOGRAM_SAMPLE: the Keras and the SavedModel paths take one sample."""
    keras.utils.set_random_seed(3)
    x = keras.Input((40, 40, 3), name="x")
    m = keras.Model(x, keras.layers.Conv2D(12, 3, padding="same", name="wide")(x))
    assert _sample_stride(40 * 40 * 12, 40) == 7  # sampled (5 divides the width)
    m.export(str(tmp_path / "wide"), verbose=False)
    data = np.random.RandomState(4).standard_cauchy(size=(6, 40, 40, 3)).astype("float32")
    q = gq.quantize_model(m, bits=8, calibration_data=data, calibration_method=method)
    r_k = [l.get_range() for l in q.layers if isinstance(l, Quantize)]
    report = gg.convert_saved_model(tmp_path / "wide", tmp_path / "q", bits=8, calibration_data=data,
                                    calibration_method=method)  # fmt: skip
    np.testing.assert_allclose(np.asarray(r_k, np.float32), np.asarray(list(report.ranges.values()), np.float32),
                               rtol=2e-7, atol=0)  # fmt: skip


def test_calibration_percentile_on_both_paths(exported, tmp_path):
    model, path = exported
    q = gq.quantize_model(model, bits=8, calibration_data=DATA, calibration_method="percentile",
                          calibration_percentile=90.0)  # fmt: skip
    r_k = [l.get_range() for l in q.layers if isinstance(l, Quantize)]
    report = gg.convert_saved_model(path, tmp_path / "q", bits=8, calibration_data=DATA,
                                    calibration_method="percentile", calibration_percentile=90.0)  # fmt: skip
    np.testing.assert_allclose(np.asarray(r_k, np.float32), np.asarray(list(report.ranges.values()), np.float32),
                               rtol=2e-7, atol=0)  # fmt: skip
    q99 = gq.quantize_model(model, bits=8, calibration_data=DATA, calibration_method="percentile")
    r99 = [l.get_range() for l in q99.layers if isinstance(l, Quantize)]
    assert all(k[1] < h[1] for k, h in zip(r_k, r99))  # p=90 clips more than the default 99.99
    for call in (lambda: gq.quantize_model(model, bits=8, calibration_data=DATA, calibration_method="percentile",
                                           calibration_percentile=100.5),
                 lambda: gg.convert_saved_model(path, tmp_path / "bad", bits=8, calibration_data=DATA,
                                                calibration_method="percentile", calibration_percentile=50)):
        with pytest.raises(ValueError, match=r"calibration_percentile must be in \(50, 100\]"):
            call()
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_new_methods_ignore_non_finite_on_both_paths(exported, tmp_path, method):
    model, path = exported
    bad = DATA.copy()
    bad[0, 0, 0, 0] = np.nan
    bad[5, 1, 1, 1] = np.inf
    q = gq.quantize_model(model, bits=8, calibration_data=bad, calibration_method=method)
    r_k = [l.get_range() for l in q.layers if isinstance(l, Quantize)]
    report = gg.convert_saved_model(path, tmp_path / "q", bits=8, calibration_data=bad, calibration_method=method)
    assert np.isfinite(np.asarray(r_k)).all()
    np.testing.assert_allclose(np.asarray(r_k, np.float32), np.asarray(list(report.ranges.values()), np.float32),
                               rtol=2e-7)  # fmt: skip
    # all NaN: a point that saw no finite value is an error on both paths. A one-conv model without activation:
    # grappler's fused Conv2D+BiasAdd+Relu (oneDNN, AVX-512 CPUs) maps NaN to 0, so behind a ReLU the points of
    # ``exported`` may see only finite values, depending on the CPU
    x = keras.Input((8, 8, 2), name="x")
    linear = _random_weights(keras.Model(x, keras.layers.Conv2D(3, 3, name="c")(x), name="lin"), RNG)
    nan = np.full_like(DATA, np.nan)
    with pytest.raises(ValueError, match=r"calibration_data: '.*': no finite value"):
        gq.quantize_model(linear, bits=8, calibration_data=nan, calibration_method=method)
    linear.export(str(tmp_path / "lin"), verbose=False)
    with pytest.raises(ValueError, match=r"calibration_data: '.*': no finite value"):
        gg.convert_saved_model(tmp_path / "lin", tmp_path / "q2", bits=8, calibration_data=nan,
                               calibration_method=method)  # fmt: skip
    assert not (tmp_path / "q2").exists()


def test_observed_graph_has_no_python_callback():
    from graphquant.graph.calibrate import RangeCollector, insert_observers
    from graphquant.graph.function import config_from_kwargs
    from graphquant.graph.planning import plan_graph_def

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 1], tf.float32)])
    def f(x):
        return tf.nn.relu(tf.nn.conv2d(x, tf.ones([3, 3, 1, 2]), 1, "SAME"))

    gd = f.get_concrete_function().graph.as_graph_def()
    plan, _ = plan_graph_def(gd, config_from_kwargs(8, None, "nearest", None, None))
    col = RangeCollector("percentile")
    try:
        assert insert_observers(gd, plan, col) == 1
        ops = {n.op for n in gd.node} | {n.op for fn in gd.library.function for n in fn.node_def}
        assert "StatefulPartitionedCall" in ops and ops & {"Bincount", "DenseBincount"}
        assert not ops & {"EagerPyFunc", "PyFunc", "PyFuncStateless"}
    finally:
        col.release()


def test_quantize_function_uses_the_engine_like_keras():
    model = _keras_model()
    fn = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32)])
    qf = gg.quantize_function(fn, bits=8, calibration_data=DATA, calibration_method="percentile")
    q = gq.quantize_model(model, bits=8, calibration_data=DATA, calibration_method="percentile")
    r_k = [l.get_range() for l in q.layers if isinstance(l, Quantize)]
    np.testing.assert_allclose(np.asarray(r_k, np.float32), np.asarray(list(qf.ranges.values()), np.float32), rtol=2e-7)


def test_progress_bar_only_when_asked_or_on_a_terminal(capsys):
    batches = [np.zeros((2, 3), "float32")] * 3
    assert list(cal.progress(iter(batches), "calibrating", verbose=False)) == batches
    assert list(cal.progress(iter(batches), "calibrating", verbose=None)) == batches  # stderr is not a terminal here
    assert capsys.readouterr().err == ""
    out = list(cal.progress(iter(batches), "calibrating", verbose=True, delay=0.0))
    assert out == batches


_PROGRESS_CHILD = r"""
import sys, time
import numpy as np, keras
import graphquant as gq
import graphquant.graph as gg

what, verbose, tmp = sys.argv[1], {"none": None, "false": False}[sys.argv[2]], sys.argv[3]
keras.utils.set_random_seed(0)
x = keras.Input((8, 8, 2), name="x")
model = keras.Model(x, keras.layers.Conv2D(3, 3, padding="same")(keras.layers.Conv2D(4, 3, padding="same")(x)))
data = np.random.RandomState(0).normal(size=(4, 8, 8, 2)).astype("float32")


def slow():  # a slow input pipeline: the loop runs about 1.5 s, past the bar's 1 s delay
    for _ in range(30):
        time.sleep(0.05)
        yield data


if what == "calibrate":
    gq.calibrate(gq.quantize_model(model, bits=8), slow(), verbose=verbose)
elif what == "compare":
    gq.compare(model, gq.quantize_model(model, bits=8, calibration_data=data), slow(), verbose=verbose)
else:
    model.export(tmp + "/float", verbose=False)
    gg.convert_saved_model(tmp + "/float", tmp + "/q", bits=8, calibration_data=slow(), verbose=verbose,
                         overwrite=True)
print("done")
"""


@pytest.mark.parametrize("what", ["calibrate", "compare", "convert"])
def test_progress_bar_draws_on_a_terminal(what, tmp_path):
    """A real terminal (a pseudo-terminal as the child's stderr): the bar shows, with batches done and
    images/s, once the loop has run a second; ``verbose=False`` silences it."""
    import os
    import pty
    import subprocess
    import sys

    def run(verbose):
        master, slave = pty.openpty()
        env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="40")
        env.pop("NO_COLOR", None)
        child = subprocess.Popen([sys.executable, "-c", _PROGRESS_CHILD, what, verbose, str(tmp_path)], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=slave, env=env)  # fmt: skip
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        out, _ = child.communicate(timeout=300)
        os.close(master)
        assert child.returncode == 0 and out.decode().strip().endswith("done"), b"".join(chunks).decode(errors="replace")
        return b"".join(chunks).decode(errors="replace")

    shown = run("none")
    label = {"calibrate": "calibrating", "compare": "comparing", "convert": "calibrating"}[what]
    assert label in shown and "images/s" in shown and "batches" in shown
    rate = float(shown.rsplit("images/s", 1)[0].split()[-1])
    assert 20 < rate < 4 * 4 / 0.05  # 4 images per batch, one batch per 0.05 s at most
    silent = run("false")
    assert "images/s" not in silent and label not in silent


def test_keras_per_channel_calibration():
    """Affine(axis=-1) activations: one range per channel, each the engine's per-channel statistic."""
    model = _keras_model()
    q = gq.quantize_model(model, format=Affine(8, axis=-1), calibration_data=DATA, calibration_method="minmax")
    layer = next(l for l in q.layers if isinstance(l, Quantize))
    lo, hi = layer.get_range()
    tap = keras.Model(model.input, model.get_layer("r1").output)(DATA).numpy().reshape(-1, 4)
    np.testing.assert_array_equal(hi, np.maximum(tap.max(0), 1e-6))
    np.testing.assert_array_equal(lo, np.minimum(tap.min(0), 0.0))
    qp = gq.quantize_model(model, format=Affine(8, axis=-1), calibration_data=DATA, calibration_method="percentile")
    lo_p, hi_p = next(l for l in qp.layers if isinstance(l, Quantize)).get_range()
    assert hi_p.shape == (4,) and (hi_p <= hi).all() and (hi_p < hi).any()


# --------------------------------------------------------------------------- inside XLA-compiled functions
def _grouped_model():
    """Grouped convolutions: Keras (TF backend) runs them as XLA-compiled functions, and so does its export.

    Without bias or activation: the export's points are the convolutions' outputs inside the XLA
    functions (a bias or activation, applied by the caller, is not in their group there), the
    same tensors the Keras path observes."""
    rng = np.random.RandomState(2)
    x = keras.Input((8, 8, 8), name="x")
    h = keras.layers.Conv2D(8, 3, padding="same", groups=4, use_bias=False, name="g1")(x)
    h = keras.layers.Conv2D(4, 3, padding="same", groups=2, use_bias=False, name="g2")(h)
    return _random_weights(keras.Model(x, h, name="grouped"), rng)


GROUPED_DATA = RNG.normal(size=(40, 8, 8, 8)).astype("float32")


@pytest.fixture(scope="module")
def grouped_export(tmp_path_factory):
    return _export(tmp_path_factory, _grouped_model())


def _in_xla_functions(path):
    """Names of the graphquant nodes inside XLA-compiled functions of a SavedModel."""
    from graphquant.graph.saved_model import read_saved_model

    lib = read_saved_model(str(path)).meta_graphs[0].graph_def.library.function
    return [n.name for f in lib if f.attr["_XlaMustCompile"].b for n in f.node_def if n.name.startswith("graphquant")]


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_grouped_conv_ranges_inside_xla_match_keras(grouped_export, tmp_path, method):
    """Observers inside XLA-compiled functions (the export's grouped convs) give the Keras path's ranges."""
    model, path = grouped_export
    q = gq.quantize_model(model, bits=8, calibration_data=GROUPED_DATA, calibration_method=method)
    r_k = [l.get_range() for l in q.layers if isinstance(l, Quantize)]
    q2 = gq.quantize_model(model, bits=8)
    r_c = gq.calibrate(q2, GROUPED_DATA, method)
    report = gg.convert_saved_model(path, tmp_path / "q", bits=8, calibration_data=GROUPED_DATA,
                                    calibration_method=method)  # fmt: skip
    assert _in_xla_functions(tmp_path / "q")  # the points (observed as they are rounded) are in XLA functions
    r_g = sorted(report.ranges.values())  # the two XLA functions come in library order
    r_k = sorted(tuple(r) for r in r_k)
    assert len(r_k) == len(r_g) == len(r_c) == 2 and r_k[0] != r_k[1]
    np.testing.assert_allclose(np.asarray(r_k, np.float32), np.asarray(r_g, np.float32), rtol=2e-7, atol=0)
    np.testing.assert_array_equal(np.asarray(r_k, np.float32), np.asarray(sorted(r_c.values()), np.float32))


def test_call_unoptimized_runs_the_function_with_its_captures():
    """Grappler off (the calibration passes): the same outputs and side effects as a plain call; inputs
    that do not match the function's fall back to the plain call."""
    v = tf.Variable(0.0)

    @tf.function
    def f(x, y):
        v.assign_add(tf.reduce_sum(x))
        return x * 2.0 + y, tf.reduce_max(x)

    cf = f.get_concrete_function(tf.TensorSpec([None], tf.float32), tf.TensorSpec([], tf.float32))
    x = np.array([1.0, 2.0, 4.0], np.float32)
    out = cal.call_unoptimized(cf, x, np.float32(0.5))
    np.testing.assert_array_equal(out[0].numpy(), [2.5, 4.5, 8.5])
    assert float(out[1]) == 4.0 and float(v.numpy()) == 7.0
    out = cal.call_unoptimized(cf, x, y=np.float32(1.0))  # a keyword: still matched by position
    np.testing.assert_array_equal(out[0].numpy(), [3.0, 5.0, 9.0])
    assert float(v.numpy()) == 14.0
    with pytest.raises((TypeError, ValueError)):  # wrong rank: the plain call's own error
        cal.call_unoptimized(cf, x[None], np.float32(0.5))


def test_observer_compiled_by_xla_counts_like_the_plain_one():
    """The observer update compiled by XLA (variables as resource inputs) keeps exactly the same
    statistics as the plain one (its Switch/Merge variant): min/max, counts, non-finite values, histograms
    (per tensor and per channel)."""
    data = [RNG.normal(size=(2, 5, 5, 4)).astype("float32") * s for s in (1.0, 10.0, 0.1)]
    data[1][0, 0, 0, 1] = np.nan
    data[1][0, 1, 0, 2] = np.inf
    data[2][1, 1, 1, 0] = -np.inf
    for axis in (None, -1):
        stats = []
        for jit in (False, True):
            o = cal.Observer("p", axis=axis, channels=4, histogram=True)
            try:
                fn = o._generic(tf.float32, 4, xla=jit)
                step = tf.function(lambda x, *h: fn(x * 1.0, cal.sample_spec(x), *h), jit_compile=jit)
                for b in data:
                    step(tf.constant(b), *[o._handle(k) for k in o.keys])
                stats.append(o.stats())
            finally:
                o.release()
        plain, xla = stats
        assert plain.nonfinite == xla.nonfinite == 3 and plain.seen == xla.seen == 600
        np.testing.assert_array_equal(plain.lo, xla.lo)
        np.testing.assert_array_equal(plain.hi, xla.hi)
        np.testing.assert_array_equal(plain.hist, xla.hist)
        np.testing.assert_array_equal(plain.exp, xla.exp)


def _nested_xla_function(jit):
    """``f`` calls an XLA-compiled function twice; that one calls a plain function (which XLA then
    compiles with it) holding the first convolution group; the second is in the XLA body itself."""
    rng = np.random.RandomState(3)
    k1 = tf.constant(rng.normal(size=(3, 3, 2, 4)).astype("float32"))
    k2 = tf.constant(rng.normal(size=(3, 3, 4, 3)).astype("float32"))

    @tf.function(autograph=False)
    def block(x):
        return tf.nn.relu(tf.nn.conv2d(x, k1, 1, "SAME"))

    @tf.function(jit_compile=jit, autograph=False)
    def body(x):
        return tf.nn.conv2d(block(x), k2, 1, "SAME")

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32)], autograph=False)
    def f(x):
        return body(x) + body(2.0 * x)

    return f


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_function_calibrates_the_same_with_and_without_xla(method):
    """Points in an XLA-compiled function, called twice, and in a plain function that XLA compiles
    as part of it: the observers' variables are threaded in as resource arguments, and the ranges are
    exactly those of the same function without XLA."""
    from graphquant.graph.calibrate import RangeCollector, insert_observers
    from graphquant.graph.function import config_from_kwargs
    from graphquant.graph.planning import plan_graph_def

    f_xla = _nested_xla_function(True)
    gd = f_xla.get_concrete_function().graph.as_graph_def()
    assert [fn for fn in gd.library.function if fn.attr["_XlaMustCompile"].b]
    plan, _ = plan_graph_def(gd, config_from_kwargs(8, None, "nearest", None, None))
    col = RangeCollector(method)
    try:
        assert insert_observers(gd, plan, col) == 2
        lib = {fn.signature.name: fn for fn in gd.library.function}
        handles = {fn.signature.name for fn in lib.values() for n in fn.node_def if n.op == "VarHandleOp"}
        handles |= {"" for n in gd.node if n.op == "VarHandleOp"}  # f's own body: the graph
        compiled = {name for name in lib if "body" in name or "block" in name}
        assert handles and not handles & compiled  # no VarHandleOp where XLA compiles
        for name in compiled:
            assert sum(a.type == tf.resource.as_datatype_enum for a in lib[name].signature.input_arg) >= 1  # the table
    finally:
        col.release()
    data = RNG.normal(size=(10, 8, 8, 2)).astype("float32")
    r_x = gg.quantize_function(f_xla, bits=8, calibration_data=data, calibration_method=method).ranges
    r_p = gg.quantize_function(_nested_xla_function(False), bits=8, calibration_data=data,
                               calibration_method=method).ranges  # fmt: skip
    assert len(r_x) == len(r_p) == 2
    np.testing.assert_array_equal(np.asarray(sorted(r_x.values()), np.float32),
                                  np.asarray(sorted(r_p.values()), np.float32))  # fmt: skip
    assert sorted(r_x.values())[0] != sorted(r_x.values())[1]


def test_observer_in_an_xla_loop_body_is_an_error_naming_it():
    """A point in a loop body that XLA compiles: the While op cannot pass the variables in; the
    error names the function and the op (instead of XLA's own 'no VarHandleOp kernel')."""
    from graphquant.graph.calibrate import RangeCollector, insert_observers
    from graphquant.graph.function import config_from_kwargs
    from graphquant.graph.planning import plan_graph_def

    k = tf.constant(RNG.normal(size=(3, 3, 2, 2)).astype("float32"))

    @tf.function(jit_compile=True, autograph=False)
    def loop(x):
        return tf.while_loop(lambda i, h: i < 2, lambda i, h: (i + 1, tf.nn.relu(tf.nn.conv2d(h, k, 1, "SAME"))),
                             (tf.constant(0), x))[1]  # fmt: skip

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32)], autograph=False)
    def f(x):
        return loop(x)

    gd = f.get_concrete_function().graph.as_graph_def()
    plan, _ = plan_graph_def(gd, config_from_kwargs(8, None, "nearest", None, None))
    assert len(plan.targets) == 1
    col = RangeCollector("minmax")
    try:
        with pytest.raises(ValueError, match=r"cannot pass a variable into XLA-compiled function '.*body.*': "
                                             r"(StatelessWhile|While) node"):  # fmt: skip
            insert_observers(gd, plan, col)
    finally:
        col.release()


def test_observers_run_beside_the_model_where_a_control_output_is_sure_to_run():
    """A point inside a function that only StatefulPartitionedCall nodes call gets its observer as a
    control output of that function (its consumers do not wait for the update); a point inside a
    function called by a PartitionedCall (which TensorFlow inlines keeping only what its data outputs
    need) keeps its consumers reading the observer's output. Both are calibrated, and alike."""
    from graphquant.graph.calibrate import RangeCollector, insert_observers
    from graphquant.graph.function import config_from_kwargs
    from graphquant.graph.planning import plan_graph_def

    k = RNG.normal(size=(3, 3, 2, 3)).astype("float32")

    def make():
        v = tf.Variable(k)

        @tf.function(autograph=False)
        def stateful(x):  # reads a variable: called by a StatefulPartitionedCall
            return tf.nn.relu(tf.nn.conv2d(x, v, 1, "SAME"))

        @tf.function(autograph=False)
        def stateless(x):  # called by a PartitionedCall
            return tf.nn.relu(tf.nn.conv2d(x, tf.constant(k), 1, "SAME"))

        @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 2], tf.float32)], autograph=False)
        def f(x):
            return stateful(x) + stateless(2.0 * x)

        return f

    f = make()
    gd = f.get_concrete_function().graph.as_graph_def()
    plan, _ = plan_graph_def(gd, config_from_kwargs(8, None, "nearest", None, None))
    col = RangeCollector("percentile")
    try:
        assert insert_observers(gd, plan, col) == 2
    finally:
        col.release()
    lib = {fn.signature.name: fn for fn in gd.library.function}
    body = {fn.signature.name: fn for fn in gd.library.function if "stateful" in fn.signature.name.split("_")}
    assert len(body) == 1
    (sf,) = body.values()
    (sl,) = [fn for name, fn in lib.items() if "stateless" in name.split("_")]
    observe = [n.name for n in sf.node_def if n.name.startswith("graphquant/observe") and n.op == "StatefulPartitionedCall"]
    assert len(observe) == 1 and observe[0] in sf.control_ret and observe[0] in sf.signature.control_output
    assert not any(i.split(":")[0] == observe[0] for n in sf.node_def for i in n.input) and observe[0] not in str(sf.ret)
    (o2,) = [n.name for n in sl.node_def if n.name.startswith("graphquant/observe") and n.op == "StatefulPartitionedCall"]
    assert o2 not in sl.control_ret and any(i.split(":")[0] == o2 for n in sl.node_def if n.name != o2 for i in n.input
                                      if not i.startswith("^")) or o2 in str(sl.ret)  # fmt: skip
    data = RNG.normal(size=(8, 6, 6, 2)).astype("float32")
    ranges = gg.quantize_function(make(), bits=8, calibration_data=data, calibration_method="percentile").ranges
    assert len(ranges) == 2 and all(hi > 0 for _, hi in ranges.values())
    relu = tf.nn.relu(tf.nn.conv2d(data, k, 1, "SAME")).numpy()
    his = sorted(hi for _, hi in ranges.values())
    # the two points see relu(conv(x)) and relu(conv(2x)) = 2 relu(conv(x)): ranges in the ratio 2 (power-of-two bins)
    assert his[1] == pytest.approx(2 * his[0], rel=1e-6) and his[0] <= relu.max()


def test_quantize_function_per_channel_ranges_calibrated_and_dynamic():
    """quantize_function with Affine(axis=-1): calibrated ranges are each channel's min/max over the data;
    without data each batch's own per-channel min/max; either way each channel is rounded on its own grid."""
    from graphquant.ops import quantize

    k = tf.constant((RNG.normal(size=(3, 3, 2, 4)) * [1.0, 3.0, 0.2, 9.0]).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32)], autograph=False)
    def f(x):
        return tf.nn.relu(tf.nn.conv2d(x, k, 1, "SAME"))

    data = RNG.normal(size=(10, 8, 8, 2)).astype("float32")
    fmt = Affine(8, axis=-1)
    tap = f(data).numpy().reshape(-1, 4)
    r = gg.quantize_function(f, format=fmt, calibration_data=data, calibration_method="minmax")
    ((lo, hi),) = r.ranges.values()
    np.testing.assert_array_equal(hi, tap.max(0))
    np.testing.assert_array_equal(lo, np.zeros(4, np.float32))
    assert len(set(hi.tolist())) == 4
    want = quantize(f(data), fmt, range=(lo, hi)).numpy()
    np.testing.assert_array_equal(r(tf.constant(data)).numpy(), want)
    dyn = gg.quantize_function(f, format=fmt)
    half = data[:5]
    t = f(half).numpy().reshape(-1, 4)
    want = quantize(f(half), fmt, range=(np.minimum(t.min(0), 0), np.maximum(t.max(0), 1e-6))).numpy()
    np.testing.assert_array_equal(dyn(tf.constant(half)).numpy(), want)


def test_a_point_no_batch_reached_is_logged_and_keeps_the_dynamic_range(tmp_path, caplog):
    """A second signature's convolution is never run by calibration: it is named in a warning, gets no
    calibrated range, and the converted model's second signature rounds it on each batch's own range."""
    import logging

    from graphquant.ops import quantize

    k = [tf.constant(RNG.normal(size=(3, 3, 2, 4)).astype("float32")) for _ in range(2)]

    class Two(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32)])
        def a(self, x):
            return tf.nn.relu(tf.nn.conv2d(x, k[0], 1, "SAME"))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32)])
        def b(self, x):
            return tf.nn.relu(tf.nn.conv2d(x, k[1], 1, "SAME"))

    m = Two()
    tf.saved_model.save(m, str(tmp_path / "f"), signatures={"serving_default": m.a, "other": m.b})
    data = RNG.normal(size=(8, 8, 8, 2)).astype("float32")
    with caplog.at_level(logging.WARNING, logger="graphquant"):
        r = gg.convert_saved_model(tmp_path / "f", tmp_path / "q", bits=8, calibration_data=data)
    assert len(r.ranges) == 1 and "_a_" in next(iter(r.ranges))
    assert any("no data reached" in rec.getMessage() and "_b_" in rec.getMessage() for rec in caplog.records)
    out = tf.saved_model.load(str(tmp_path / "q")).signatures["other"](x=tf.constant(data))["output_0"].numpy()
    ref = tf.nn.relu(tf.nn.conv2d(data, k[1], 1, "SAME"))
    want = quantize(ref, Affine(8), range=(0.0, float(tf.reduce_max(ref)))).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
