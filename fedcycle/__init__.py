"""fedcycle: one deep model trained across data centers that cannot pool their data.

Flower FedAvg with a server-set cyclical learning rate and more local epochs per round,
after Xu et al., "Collaborative Deep Learning Across Multiple Data Centers" (2018).
"""

__version__ = "0.1.0"
