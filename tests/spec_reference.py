"""An independent, loop-by-loop float64 reading of ../shared/spec/lookhere-semantics.md.

Deliberately naive (pure Python over every query, key and head) so that it shares no code with the
package; only for small grids.
"""

import math

SEES = {
    "up": lambda qy, qx, ky, kx: ky <= qy,
    "down": lambda qy, qx, ky, kx: ky >= qy,
    "left": lambda qy, qx, ky, kx: kx <= qx,
    "right": lambda qy, qx, ky, kx: kx >= qx,
    "tri_up": lambda qy, qx, ky, kx: qy - ky >= abs(kx - qx),
    "tri_down": lambda qy, qx, ky, kx: ky - qy >= abs(kx - qx),
    "tri_left": lambda qy, qx, ky, kx: qx - kx >= abs(ky - qy),
    "tri_right": lambda qy, qx, ky, kx: kx - qx >= abs(ky - qy),
    "zero": lambda *a: True,
    "center": lambda *a: True,
}
for _a in ("up", "down"):
    for _b in ("left", "right"):
        SEES[f"diag_{_a}_{_b}"] = (lambda a, b: lambda *c: SEES["tri_" + a](*c) or SEES["tri_" + b](*c))(_a, _b)

NAMED = {
    "halves": [["up"], ["down"], ["left"], ["right"]],
    "corners": [["up", "left"], ["up", "right"], ["down", "left"], ["down", "right"]],
    "triangles": [["tri_up"], ["tri_down"], ["tri_left"], ["tri_right"]],
    "diagonals": [["diag_up_right"], ["diag_up_left"], ["diag_down_right"], ["diag_down_left"]],
    "eighths1": [["tri_up", "left"], ["tri_down", "left"], ["tri_left", "up"], ["tri_right", "up"]],
    "eighths2": [["tri_up", "right"], ["tri_down", "right"], ["tri_left", "down"], ["tri_right", "down"]],
    "none": [[]] * 4,
    "zero": [["zero"]] * 4,
    "center": [["center"]] * 4,
    "zerohalves": [["zero", "up"], ["zero", "down"], ["zero", "left"], ["zero", "right"]],
    "zerocorners": [["zero", "up", "left"], ["zero", "up", "right"], ["zero", "down", "left"],
                    ["zero", "down", "right"]],
    "zerotriangles": [["zero", "tri_up"], ["zero", "tri_down"], ["zero", "tri_left"], ["zero", "tri_right"]],
    "none1zero3": [[]] + [["zero"]] * 3,
    "none2zero2": [[]] * 2 + [["zero"]] * 2,
    "none3zero1": [[]] * 3 + [["zero"]],
}


def heads_of(directions, num_heads):
    """[(name, primitives)] per head, per the spec's head-count table."""
    names = directions.split("-")
    per = {  # (number of names, heads) -> repetitions of each name's 4 heads
        (2, 12): [2, 1], (2, 16): [2, 2], (3, 12): [1, 1, 1], (3, 16): [2, 1, 1], (4, 16): [1, 1, 1, 1],
    }
    if num_heads == 6 and len(names) == 2:
        return [(names[0], p) for p in NAMED[names[0]]] + [(names[1], p) for p in NAMED[names[1]][:2]]
    if len(names) == 1 and num_heads % 4 == 0:
        reps = [num_heads // 4]
    else:
        reps = per[(len(names), num_heads)]
    out = []
    for name, r in zip(names, reps):
        out += [(name, p) for p in NAMED[name]] * r
    return out


def slopes_of(heads):
    out, i = [], 0
    while i < len(heads):
        j = i
        while j < len(heads) and heads[j][0] == heads[i][0]:
            j += 1
        n, name = j - i, heads[i][0]
        if "zero" in name or "center" in name or "none" in name:
            base = [1 / 4, 1 / 16, 1 / 64, 1 / 256]
            out += base[:2] if n == 2 else base if n == 4 else [b for b in base for _ in range(n // 4)]
        else:
            out += [0.5 ** (1 + t // 4) for t in range(n)]
        i = j
    return out


def bias(config, grid, depth, num_heads):
    """Nested lists [layer][head][q][k] of floats (-inf where masked)."""
    gy, gx = grid
    dist_kind = config.get("distance", "linear")
    fill = config.get("fill_with", "inf")
    first, last = config["layer_slopes"]
    heads = heads_of(config["head_directions"], num_heads)
    hs = slopes_of(heads)
    pts = [(i // gx, i % gx) for i in range(gy * gx)]

    def transform(d):
        return math.sqrt(d) if dist_kind == "sqrt" else d * d if dist_kind == "square" else d

    def penalty(prims, q, k):
        if "zero" in prims:
            return 0.0
        if "center" in prims:
            return math.hypot(k[1] - (gx - 1) / 2, k[0] - (gy - 1) / 2)
        return transform(math.hypot(k[0] - q[0], k[1] - q[1]))

    out = []
    for layer in range(depth):
        ls = first if depth == 1 else first + (last - first) * layer / (depth - 1)
        lay = []
        for (name, prims), s in zip(heads, hs):
            pmax = max(penalty(prims, q, k) for q in pts for k in pts)
            rows = []
            for q in pts:
                row = []
                for k in pts:
                    seen = all(SEES[p](q[0], q[1], k[0], k[1]) for p in prims)
                    pen = penalty(prims, q, k)
                    if not seen:
                        if fill == "inf":
                            row.append(-math.inf)
                            continue
                        pen = 0.0 if fill == "zero" else pmax
                    row.append(-(config["global_slope"] * ls * s * pen))
                rows.append(row)
            lay.append(rows)
        out.append(lay)
    return out
