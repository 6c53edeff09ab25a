"""GPU placement planner (`python -m gateway gpu plan`).

`plan` holds the pure decision (models and GPUs in, a `Plan` or a refusal out), `sources`
reads manifests, route SLOs and the GPU inventory, `render` turns a plan into Triton
`instance_group` blocks, a docker-compose override and Kubernetes overlay files, and `cli`
wires them to the command line.
"""
