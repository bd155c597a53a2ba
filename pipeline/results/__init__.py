"""What a person reads: the evaluation's arithmetic, the results table and plots, the routing page, the compressor floor."""
