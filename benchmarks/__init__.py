"""The benchmarks: above every layer of the product (they may import all of it), run from a checkout,
never shipped (not in the wheel, not in the images). `thumbtune bench ...` runs them."""
