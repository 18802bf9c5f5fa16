"""Deploying built libraries to machines without TVM's compiler: `bundle` writes the folder,
`shared_objects` finds what TVM's runtime libraries link."""
