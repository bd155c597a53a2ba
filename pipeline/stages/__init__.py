"""The four stages side by side, and `moie run`'s sequence of them. A stage reads what an
earlier stage wrote, and writes its own outputs, through `pipeline.store.catalog`; no stage
module imports another."""
