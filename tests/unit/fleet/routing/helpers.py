from proxy.fleet.backends import Instance


def instances(*urls):
    return [Instance(url) for url in urls]
