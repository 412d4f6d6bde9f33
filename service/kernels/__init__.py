"""Mask application: out[i] = w[i] if bit i of `nonzero` is set (negated if bit i of `negative` is), else +0.

Every implementation is held bit-exact to `reference.apply_masks_reference` by the tests.
"""
