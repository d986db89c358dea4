"""Datastores of the app: the DICOMweb datastore that works offline (:mod:`lib.datastore.dicomweb`)."""
