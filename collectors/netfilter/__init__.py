"""Netfilter rules: the model, the iptables-save and nft JSON parsers, the port-53 rule analysis and
the DNS flow evaluator."""
