"""Thin async adapters over the Azure SDK: compute (VMs, Run Command), credentials."""
