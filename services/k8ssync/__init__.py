"""Kubernetes integration: the API watch feeding the owning services, status write-back, CNI."""
