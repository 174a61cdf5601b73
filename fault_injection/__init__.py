"""fault_injection: faults as data, the injector, scenario files and the chaos runner."""
