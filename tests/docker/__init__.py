"""Helpers of the deployment tests that run Docker (tests/test_deploy_docker.py)."""
