"""avma-remediator engine: detect AVMA-keyed Windows VMs in Azure and move them to the Azure KMS.

The package never imports ``azure.functions``; the Functions triggers are thin adapters around it.
"""

__version__ = "0.1.0"
