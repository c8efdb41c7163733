"""Small built-in colour maps for the depth visualization, as 256x3 uint8 lookup tables.

Each map is a published polynomial fit (coefficients per channel, lowest power first)
evaluated at 256 points, so no plotting library is needed.
"""

from __future__ import annotations

import numpy as np

# Turbo (Google, 2019): a 5th-degree polynomial fit per channel.
_TURBO = (
    (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943),
    (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604),
    (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973),
)

# Inferno (matplotlib's perceptually uniform map): a 6th-degree polynomial fit per channel.
_INFERNO = (
    (0.0002189403691192265, 0.1065134194856116, 11.60249308247187, -41.70399613139459,
     77.162935699427, -71.31942824499214, 25.13112622477341),
    (0.001651004631001012, 0.5639564367884091, -3.972853965665698, 17.43639888205313,
     -33.40235894210092, 32.62606426397723, -12.24266895238567),
    (-0.01948089843709184, 3.932712388889277, -15.9423941062914, 44.35414519872813,
     -81.80730925738993, 73.20951985803202, -23.07032500287172),
)

_FITS = {"turbo": _TURBO, "inferno": _INFERNO}

NAMES = ("gray", *_FITS)


def lookup_table(name: str) -> np.ndarray | None:
    """The (256, 3) uint8 table of a colour map, or None for "gray" (the 8-bit map as it is)."""
    if name == "gray":
        return None
    if name not in _FITS:
        raise KeyError(f"unknown colour map {name!r}; known: {', '.join(NAMES)}")
    t = np.linspace(0.0, 1.0, 256)
    channels = [np.polynomial.polynomial.polyval(t, coefficients) for coefficients in _FITS[name]]
    return (np.clip(np.stack(channels, axis=1), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
