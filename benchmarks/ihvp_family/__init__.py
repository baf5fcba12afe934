"""The inverse-Hessian family benchmark (``benchmarks/bench_ihvp_family.py``), in the order a row flows:

- :mod:`.workloads`: what to run: the rows (:class:`~.workloads.Spec`) of W1 and W2 and each workload's configuration;
- :mod:`.cache`: the cached data subset, trained models and references (safetensors, atomic writes);
- :mod:`.prepare`: the prepare step: load MNIST, train the model, compute the references (cached);
- :mod:`.context`: what a worker loads for a row: data, model, objectives, curvature operators, references;
- :mod:`.solvers`: one builder per method (``BUILDERS``), fitting included;
- :mod:`.runner`: one row in a fresh worker process, timed, and compared with the references;
- :mod:`.report`: the Markdown table, notes and results.json.

The entry point ``bench_ihvp_family.py`` parses the command line and loops over workloads and rows.
"""
