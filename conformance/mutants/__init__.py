"""Mutation check of the conformance suite: named bugs planted in copies of the reference backend.

``catalog`` holds the mutants (each one text replacement in one file of the ``ray`` backend
or a shared rule it uses, and the cases that should see it); ``run`` applies one to a
temporary copy of the tree and runs those cases against it in a bounded subprocess whose
imports (Ray workers included) come from the copy; ``_child`` is that subprocess. The
installed code is never changed. ``benchmarks/bench_mutation.py`` prints the table and the
mutation score; tests/conformance/test_mutation_sample.py runs the fixed sample in CI.
See docs/benchmarks.md ("Mutation score") and docs/semantics.md ("Mutants no case kills").
"""

from conformance.mutants.catalog import BY_NAME, CATEGORIES, MUTANTS, SAMPLE, Mutant, MutantError, check_all

__all__ = ["BY_NAME", "CATEGORIES", "MUTANTS", "SAMPLE", "Mutant", "MutantError", "check_all"]
