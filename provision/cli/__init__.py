"""The command layer on top of provision/, infra/ and workloads/: every `fab` / `gpuforge` task.

    argv.py           argv conveniences (key=value overrides, `--` remainders), one-line errors
    cluster_tasks.py  up, down, use, clusters, setup, bake, doctor
    run_tasks.py      train, status, logs, cancel, fetch, exec
    dev_tasks.py      ssh, ssh-config, forward, jupyter, tensorboard, serve
    report.py         what the tasks print (rich tables, progress)
    main.py           the `gpuforge` console command over the same tasks
    demo.py           `make demo`
    doctor.py         the checks behind `doctor`
"""
