"""The book's experiments, reproduced with real guests under KVM: "Watching Dynamic Memory"
(watch_dynamic_memory) and memory contention between weighted VMs (contention). docs/experiments.md."""
