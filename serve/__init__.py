"""The Ray Serve application (model deployment, generation engine, HTTP ingress).

Nothing here yet beyond the package: serving arrives with its own issue.
"""
