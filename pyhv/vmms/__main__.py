"""`python -m pyhv.vmms serve|vm|counters`: the VMMS commands on their own (the same commands
as `pyhv vmms serve`, `pyhv vm ...`, `pyhv counters`)."""

import click

from pyhv.vmms.cli import counters_command, vm_group, vmms_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The pyhv VMMS and its client."""


main.add_command(vmms_group.commands["serve"])
main.add_command(vm_group)
main.add_command(counters_command)

if __name__ == "__main__":
    main(prog_name="python -m pyhv.vmms")
