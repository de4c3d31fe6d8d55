"""fedcycle's tools: the `fedcycle` command, the simulation launcher, the deployment, the
reproduction study and its report, the benchmark and the demo data.

They import the runtime (`fedcycle`, the Flower app that runs on the server and at every site);
the runtime never imports them, and they do not travel to the sites.
"""
