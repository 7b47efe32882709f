"""Toy 2-D drifting (paper Fig. 3/4, Table 1 ablations on the toy): python -m reference_trainers.toy.toy2d."""
