"""`joule report`: one page of a job's power, energy, size, throughput and decisions over time."""
