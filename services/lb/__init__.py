"""Load-balancer service: Services, backends and Maglev tables."""
