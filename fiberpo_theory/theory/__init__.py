"""The claim-checking machinery: tabular trust-region instances (App. B-D), the claim
registry the checks register with, and the Hypothesis strategies their searches draw from."""
