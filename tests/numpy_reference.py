"""An independent NumPy oracle for multi-scale deformable attention.

Written from the formula, one sample and one corner at a time, in float64:
pixel coordinate x = loc_x * W - 0.5 (align_corners=False), the four
neighbouring pixels weighted bilinearly, pixels outside the map read as zero.
Returns the output and the gradients of <output, grad_out> with respect to
value, sampling_locations and attention_weights.
"""

import numpy as np


def ms_deform_attn_numpy(value, spatial_shapes, sampling_locations, attention_weights,
                         grad_out):
    value = np.asarray(value, np.float64)
    loc = np.asarray(sampling_locations, np.float64)
    attn = np.asarray(attention_weights, np.float64)
    n, s, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = loc.shape
    grad_out = np.asarray(grad_out, np.float64).reshape(n, lq, m, d)
    out = np.zeros((n, lq, m, d))
    grad_value = np.zeros_like(value)
    grad_loc = np.zeros_like(loc)
    grad_attn = np.zeros_like(attn)
    starts = np.cumsum([0] + [h * w for h, w in spatial_shapes])
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                g = grad_out[b, q, head]
                for level, (h, w) in enumerate(spatial_shapes):
                    for p in range(num_points):
                        x = loc[b, q, head, level, p, 0] * w - 0.5
                        y = loc[b, q, head, level, p, 1] * h - 0.5
                        x0, y0 = int(np.floor(x)), int(np.floor(y))
                        fx, fy = x - x0, y - y0
                        a = attn[b, q, head, level, p]
                        sample = np.zeros(d)
                        d_sample_dx = np.zeros(d)
                        d_sample_dy = np.zeros(d)
                        for yi, xi, wy, wx, dwy, dwx in (
                                (y0, x0, 1 - fy, 1 - fx, -1, -1),
                                (y0, x0 + 1, 1 - fy, fx, -1, 1),
                                (y0 + 1, x0, fy, 1 - fx, 1, -1),
                                (y0 + 1, x0 + 1, fy, fx, 1, 1)):
                            if not (0 <= xi < w and 0 <= yi < h):
                                continue
                            token = starts[level] + yi * w + xi
                            v = value[b, token, head]
                            sample += wy * wx * v
                            d_sample_dx += wy * dwx * v
                            d_sample_dy += dwy * wx * v
                            grad_value[b, token, head] += a * wy * wx * g
                        out[b, q, head] += a * sample
                        grad_attn[b, q, head, level, p] = g @ sample
                        grad_loc[b, q, head, level, p, 0] = a * (g @ d_sample_dx) * w
                        grad_loc[b, q, head, level, p, 1] = a * (g @ d_sample_dy) * h
    return out.reshape(n, lq, m * d), grad_value, grad_loc, grad_attn
