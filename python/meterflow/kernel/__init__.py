"""The ground floor: facts every stage shares, importing nothing else of MeterFlow.

Owns: ids and their rules (`ids`), the injectable clock (`clock`), the calendar of zones and periods
(`calendar`), the flush ids (`flush_ids`), the one door to the Rust core (`rust`), the error table and
the field errors (`errors`), strict query parameters (`params`), and exact decimal text, currencies and
rounding (`money`).
Does not own: settings (`config`), I/O of any kind, nor any stage's rules.
"""
